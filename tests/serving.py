"""A server running in this process on 127.0.0.1 and an ephemeral port, for the server tests."""

from __future__ import annotations

import threading
import time

import openai

from offload_moe.serve.app import bind, make_server
from offload_moe.serve.guard import Limits
from offload_moe.serve.service import Service


class Running:
    def __init__(self, engine, name: str, limits: Limits | None = None, api_key: str | None = None, **kw):
        self.service = Service(engine, name, **kw)
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.service, sock, limits, api_key=api_key)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the server did not start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=30)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    def idle(self, timeout: float = 10) -> bool:
        sched = self.service.scheduler
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sched.busy and not self.service.worker.handlers:
                return True
            time.sleep(0.02)
        return False

"""`serve`: the OpenAI-compatible HTTP server (`serve.app`) over the engine the flags describe, until Ctrl-C
or SIGTERM; the routing trace of every request served is written when it stops."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..atomic import check_target
from ..errors import UserError
from ..planning.trace import save_trace
from ..serve.app import bind, make_server, require_fastapi
from ..serve.guard import API_KEY_ENV, Limits
from ..serve.service import Service
from .run_cmds import load_engine


def cmd_serve(args: argparse.Namespace) -> int:
    require_fastapi()
    if args.api_key == "":
        raise UserError("--api-key must not be empty (leave it out to serve without a key)")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.trace_out:
        check_target(args.trace_out)  # now, not when the server stops and the trace would be lost
    limits = Limits(args.max_request_bytes, args.max_connections, args.header_timeout, args.shutdown_grace,
                    tuple(args.allow_host))
    engine = load_engine(args)
    service = Service(engine, args.served_model_name or engine.name, max_batch=args.max_batch,
                      max_queue=args.max_queue, template_args=args.template_args)
    sock = bind(args.host, args.port)
    if args.trace_out:
        engine.start_trace(args.model)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {service.model_id} at http://{shown}:{port}/v1 (max batch {args.max_batch}, queue "
          f"{args.max_queue}{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends as Ctrl-C does, after the shutdown
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # uvicorn: SIGINT/SIGTERM finish or cancel the requests
        make_server(service, sock, limits, args.log_level, args.access_log, api_key=api_key).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
        pass
    if args.trace_out:  # the step thread has stopped with the server
        save_trace(args.trace_out, engine.stop_trace())
        print(f"wrote {args.trace_out}", file=sys.stderr)
    print("stopped", file=sys.stderr)
    return 0

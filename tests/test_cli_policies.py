"""The eviction policies and the slot pool as a user reaches them: engine flags, `simulate --policy all`, the
prefetch a trace says its engine ran, and `tune`'s honest refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli as cli

from offload_moe.offload.eviction import ONLINE_POLICIES
from offload_moe.planning.trace import Trace, save_trace


def test_every_policy_runs_in_either_pool(ckpts, capsys):
    for policy in ONLINE_POLICIES:
        for pool in ("layer", "global"):
            code, out, err = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt-ids", "1,415",
                                 "--cache-experts", "2,4,3", "--policy", policy, "--slot-pool", pool,
                                 "--max-new-tokens", "4", "--json")
            assert code == 0, err
            stats = json.loads(out)["stats"]
            assert stats["slot_pool"] == pool and stats["slots_per_layer"] == [2, 4, 3]
            assert sum(stats["per_layer_hits"]) + sum(stats["per_layer_misses"]) == stats["hits"] + stats["misses"]
    code, out, _ = cli(capsys, "generate", "--model", str(ckpts["base"]), "--prompt-ids", "1", "--cache-experts", "2",
                       "--slot-pool", "global", "--max-new-tokens", "2")
    assert code == 0 and "one pool of 6 shared by every layer" in out


def test_an_unknown_policy_or_pool_is_a_usage_error(ckpts):
    for flag, value in (("--policy", "mru"), ("--slot-pool", "shared")):
        with pytest.raises(SystemExit) as exc:
            cli(None, "generate", "--model", str(ckpts["base"]), flag, value)
        assert exc.value.code == 2


def small_trace(tmp_path, metadata: dict | None = None) -> str:
    rng = np.random.default_rng(3)
    experts = np.argsort(rng.random((120, 2, 6)), axis=-1)[..., :2].astype(np.int32)  # [T, L, K]
    predicted = np.roll(experts, 1, axis=0)
    predicted[0] = -1  # as a recorded trace: nothing predicted before its first token
    path = tmp_path / "t.trace"
    save_trace(path, Trace(experts, np.full(experts.shape, 0.5, np.float32), predicted, 6, 2, 2, "test",
                           dict(metadata or {})))
    return str(path)


def test_simulate_all_policies_in_a_global_pool_and_the_recorded_prefetch(tmp_path, capsys):
    path = small_trace(tmp_path)
    code, out, err = cli(capsys, "simulate", "--trace", path, "--policy", "all", "--slot-pool", "global", "--slots",
                         "2,3", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert [r["policy"] for r in got["results"]] == [p for p in ONLINE_POLICIES for _ in (2, 3)] + ["belady"] * 2
    assert got["pool"] == "global" and {r["pool"] for r in got["results"]} == {"global"}
    assert got["prefetch"] == 0  # no `prefetch` metadata: a trace from before it, or of an engine without prefetch
    path = small_trace(tmp_path, {"prefetch": "1"})
    code, out, err = cli(capsys, "simulate", "--trace", path, "--policy", "lru", "--json")
    assert code == 0 and json.loads(out)["prefetch"] == 1  # the engine that recorded it prefetched
    code, out, err = cli(capsys, "simulate", "--trace", path, "--policy", "lru", "--prefetch", "0", "--json")
    assert json.loads(out)["prefetch"] == 0
    code, out, err = cli(capsys, "simulate", "--trace", path, "--policy", "lru", "--batch", "3")
    assert code == 0 and "next-forward optimum" in out
    code, out, err = cli(capsys, "simulate", "--trace", path, "--policy", "lru", "--slot-pool", "global", "--timed",
                         "--json")
    assert code == 0 and {r["pool"] for r in json.loads(out)["results"]} == {"global"}
    timed = json.loads(out)["timed"]["results"]
    want = {r["slots"]: r["hits"] for r in json.loads(out)["results"] if r["policy"] == "lru"}
    assert all(r["hits"] == want[r["slots"]] for r in timed if r["lead"])  # the timed replay's pool is the table's


def test_tune_refuses_a_trace_without_a_model_shape_at_once(tmp_path, capsys):
    code, out, err = cli(capsys, "tune", "--trace", small_trace(tmp_path), "--budget", "24GB")
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: trace {tmp_path / 't.trace'} records no model shape (its 'config' "
                                        "metadata): record it with profile or generate --trace-out, which write it"]

"""Predictors: which rows each row's entry predicts, the ranking, the learned predictor's file and training,
hidden-state traces, and the predictors replayed offline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from offload_moe.cli.entry import main
from offload_moe.demo import resolve_model
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.offload.predictors import (
    FILE_NAME,
    LearnedPredictor,
    RouterPredictor,
    load_predictor,
    ranked,
    replayed,
    save_predictor,
    source_of,
    targets_of,
)
from offload_moe.options import EngineOptions
from offload_moe.planning.costs import DEFAULT_HARDWARE, model_shape
from offload_moe.planning.replay import simulate
from offload_moe.planning.timed import deeper_of
from offload_moe.planning.trace import Trace, load_trace, save_trace, slice_trace
from offload_moe.planning.train_predictor import calibration_of
from offload_moe.planning.tune import tune, winner_profile
from offload_moe.planning.validate import rescore
from offload_moe.profiles import load_profile


@pytest.mark.parametrize("rows", [2, 3, 5])
def test_every_row_is_predicted_once_per_token_from_its_source(rows):
    for lead in range(1, rows):
        made = [(target, nxt, row) for row in range(rows) for target, nxt in targets_of(row, lead, rows)]
        assert sorted(t for t, _, _ in made) == list(range(rows))  # each row once per token
        for target, nxt, row in made:
            assert source_of(target, lead, rows) == (row, nxt)
            assert (target < lead) == nxt  # the first `lead` rows come from the token before


def test_ranked_puts_the_routers_pick_first_then_the_rest_by_score():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2]])
    first = torch.tensor([[2, 0]])  # the router's own pick (e.g. with groups) need not be the top scores
    assert ranked(first, scores, 2).tolist() == [[2, 0]]
    assert ranked(first, scores, 4).tolist() == [[2, 0, 1, 3]]
    assert ranked(None, scores, 3).tolist() == [[1, 3, 2]]


def synthetic_trace(T=1200, L=3, E=8, K=2, D=16, seed=0) -> Trace:
    """Routing that is a fixed function of the hidden state one layer earlier (for layer 0: the previous token's
    last layer), so a learned predictor can find it and the frequency prior cannot."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((T, L, D)).astype(np.float16)
    maps = rng.standard_normal((L, D, E))
    experts = np.zeros((T, L, K), np.int32)
    for row in range(L):
        src = hidden[:, row - 1] if row else np.roll(hidden[:, L - 1], 1, axis=0)
        experts[:, row] = np.argsort(-(src.astype(np.float64) @ maps[row]), axis=1)[:, :K]
    return Trace(experts, np.full((T, L, K), 0.5, np.float32), np.full((T, L, K), -1, np.int32), E, K, L,
                 "synthetic", {}, {"hidden": hidden, "forward_tokens": np.ones(T, np.int64)})


def test_train_predictor_learns_routing_and_simulate_replays_it(tmp_path, capsys):
    save_trace(tmp_path / "s.trace", synthetic_trace())
    out = tmp_path / "s.pred"
    assert main(["train-predictor", str(tmp_path / "s.trace"), "--out", str(out), "--steps", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    recall = report["recall"]["2"]
    assert "900 tokens" in report["note"] and "last 300" in report["note"]  # fitted on the head, scored on the tail
    assert min(recall["learned"]) > 0.8 > max(recall["frequency"])
    model = load_predictor(out, 3, 16, 8)
    assert model.lead == 1 and isinstance(model, LearnedPredictor)
    trace = load_trace(tmp_path / "s.trace")
    tail = slice_trace(trace, 900, 1200)
    # the file's calibration is measured on the held-out tail, over every expert ranked (one code path)
    assert report["calibrated"] and model.meta["calibrated_tokens"] == "300"
    assert np.allclose(model.calibration, calibration_of(model, tail))
    assert model.calibration.shape == (3, 8) and model.calibration[:, 0].min() > 0.8  # the learned top rank is used
    assert tail.tensors["hidden"].shape == (300, 3, 16)
    without = simulate(tail, 4, "lru")["hit_rate"]
    best = simulate(tail, 4, "belady")["hit_rate"]
    learned = simulate(replayed(tail, str(out), 4), 4, "lru", prefetch=1)
    assert learned["hit_rate"] > best > without  # prediction beats the offline optimum without it
    assert main(["simulate", "--trace", str(tmp_path / "s.trace"), "--predictor", str(out), "--slots", "4",
                 "--policy", "lru", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert res[0]["prefetch"] == 1 and res[0]["hit_rate"] > 0.9


def test_train_predictor_fits_and_calibrates_every_lead_up_to_lead(tmp_path, capsys):
    save_trace(tmp_path / "s.trace", synthetic_trace())
    out = tmp_path / "s.pred"
    assert main(["train-predictor", str(tmp_path / "s.trace"), "--out", str(out), "--steps", "50", "--lead", "2",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["leads"] == [1, 2] and report["lead"] == 2 and report["calibrated"]
    model = load_predictor(out, 3, 16, 8)
    tail = slice_trace(load_trace(tmp_path / "s.trace"), 900, 1200)
    assert model.lead == 1 and [d.lead for d in model.deeper] == [2]
    assert np.allclose(model.deeper[0].calibration, calibration_of(model.deeper[0], tail))
    # replayed from hidden states, the deeper lead comes along for the timed replay, which decides it
    cut = replayed(tail, str(out), 2)
    assert cut.tensors["predicted_lead2"].shape == (300, 3, 2) and np.allclose(cut.tensors["calibration"],
                                                                               model.calibration)
    assert [(d.lead, d.calibration.shape) for d in deeper_of(cut)] == [(2, (3, 8))]
    assert main(["simulate", "--trace", str(tmp_path / "s.trace"), "--predictor", str(out), "--slots", "4",
                 "--policy", "lru", "--timed", "--json"]) == 0
    assert [r["decided"] for r in json.loads(capsys.readouterr().out)["timed"]["results"]] == [True, False]
    # nothing held out: --lead's model alone, uncalibrated (a fixed width at that depth)
    assert main(["train-predictor", str(tmp_path / "s.trace"), "--out", str(out), "--steps", "50", "--lead", "2",
                 "--holdout", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["leads"] == [2]
    alone = load_predictor(out, 3, 16, 8)
    assert alone.lead == 2 and alone.deeper == [] and alone.calibration is None


def test_train_predictor_and_simulate_refuse_a_trace_without_hidden_states(tmp_path, capsys):
    trace = synthetic_trace(T=100)
    trace.tensors.pop("hidden")
    save_trace(tmp_path / "t.trace", trace)
    assert main(["train-predictor", str(tmp_path / "t.trace"), "--out", str(tmp_path / "p")]) == 1
    assert "profile --hidden-states" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    save_predictor(tmp_path / "p", [{"w1": torch.zeros(4, 16), "b1": torch.zeros(4), "w2": torch.zeros(8, 4),
                                     "b2": torch.zeros(8)} for _ in range(3)], 1, {})
    assert main(["simulate", "--trace", str(tmp_path / "t.trace"), "--predictor", str(tmp_path / "p")]) == 1
    assert "hidden states" in capsys.readouterr().err
    save_trace(tmp_path / "h.trace", synthetic_trace(T=100))
    before = (tmp_path / "p").read_bytes()
    assert main(["train-predictor", str(tmp_path / "h.trace"), "--out", str(tmp_path / "p"), "--lead", "3"]) == 1
    assert "--lead must be from 1 to 2" in capsys.readouterr().err
    for flag, value in (("--batch", "0"), ("--lr", "-1"), ("--steps", "0")):
        assert main(["train-predictor", str(tmp_path / "h.trace"), "--out", str(tmp_path / "p"), flag, value]) == 1
        assert "must be positive" in capsys.readouterr().err
    assert main(["train-predictor", str(tmp_path / "h.trace"), "--out", str(tmp_path / "no" / "p")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert (tmp_path / "p").read_bytes() == before  # a refused run leaves the user's file as it was


def test_profile_records_hidden_states_and_auto_loads_the_model_folders_predictor(ckpts, tmp_path, capsys):
    trace_path = tmp_path / "h.trace"
    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=3))
    engine.start_trace("base", hidden=True)
    engine.generate([1, 415, 2936], max_new_tokens=40)
    save_trace(trace_path, engine.stop_trace())
    trace = load_trace(trace_path)
    c = engine.config
    assert trace.tensors["hidden"].shape == (42, c.n_moe_layers, c.dim) and trace.tensors["hidden"].dtype == np.float16
    folder = tmp_path / "model"
    shutil.copytree(ckpts["base"], folder)
    assert main(["train-predictor", str(trace_path), "--out", str(folder / FILE_NAME), "--holdout", "0",
                 "--steps", "20"]) == 0
    assert "no calibration" in capsys.readouterr().out  # nothing held out: the engine prefetches a fixed width
    assert load_predictor(folder / FILE_NAME, c.n_moe_layers, c.dim, c.num_experts).calibration is None

    def predictor(**options):
        return Engine.load(folder, EngineOptions(cache_experts=3, **options)).model.prefetcher.predictor

    assert isinstance(predictor(), LearnedPredictor) and isinstance(predictor(predictor="router"), RouterPredictor)
    with pytest.raises(UserError, match="predicts 1 layer"):
        Engine.load(folder, EngineOptions(cache_experts=3, prefetch=2))
    with pytest.raises(UserError, match="trained for"):
        Engine.load(ckpts["top3"], EngineOptions(cache_experts=3, predictor=str(folder / FILE_NAME)))
    assert main(["generate", "--model", str(ckpts["base"]), "--prompt-ids", "1,2", "--cache-experts", "3",
                 "--predictor", str(tmp_path / "nothing.pred")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pred").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_predictor(tmp_path / "junk.pred", 3, 64, 8)


def test_a_router_input_predictor_reads_each_rows_router_input_after_its_attention(ckpts, tmp_path, capsys,
                                                                                  monkeypatch):
    """A trace records each row's router input: the router on it picks the experts the trace holds. train-predictor
    fits on it by default and says so in the file; the engine then calls the prefetcher with the very tensor the
    row's experts get (after the attention), and the tokens are those of no prefetch. A predictor that reads what
    a trace does not hold is refused in one line."""
    from offload_moe.modeling.transformer import Transformer

    engine = Engine.load(ckpts["base"], EngineOptions(cache_experts=3, prefetch=0, dtype="float32"))
    engine.start_trace("base", hidden=True)
    alone = engine.generate([1, 415, 2936], max_new_tokens=60).tokens
    trace = engine.stop_trace()
    model, c = engine.model, engine.config
    x = torch.from_numpy(trace.tensors["router_input"].astype(np.float32))  # [T, L, D]
    assert x.shape == trace.tensors["hidden"].shape == (62, c.n_moe_layers, c.dim)
    for row in range(c.n_moe_layers):
        picked = model.route(model.layers[model.rows[row]], x[:, row])[1].sort(-1).values.numpy()  # [T, K]
        assert (picked == np.sort(trace.experts[:, row], -1)).all(-1).mean() > 0.95  # float16 may flip a near tie
    save_trace(tmp_path / "r.trace", trace)
    path = tmp_path / "r.pred"
    assert main(["train-predictor", str(tmp_path / "r.trace"), "--out", str(path), "--steps", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == "router_input"
    assert load_predictor(path, c.n_moe_layers, c.dim, c.num_experts).meta["input"] == "router_input"
    seen, given = [], []
    moe = Transformer.moe
    monkeypatch.setattr(Transformer, "moe", lambda self, row, blk, x, *a: seen.append(x) or moe(self, row, blk, x, *a))
    learned = Engine.load(ckpts["base"], EngineOptions(cache_experts=3, dtype="float32", predictor=str(path)))
    prefetcher = learned.model.prefetcher
    assert prefetcher.input == "router_input"
    call = prefetcher.__call__  # the model calls the instance, so a subclass watches it
    prefetcher.__class__ = type("Watched", (type(prefetcher),), {
        "__call__": lambda self, row, h, decode: given.append(h) or call(row, h, decode)})
    assert learned.generate([1, 415, 2936], max_new_tokens=60).tokens == alone
    assert given and len(given) == len(seen) and all(h is x for h, x in zip(given, seen, strict=True))
    trace.tensors.pop("router_input")
    save_trace(tmp_path / "h.trace", trace)
    assert main(["simulate", "--trace", str(tmp_path / "h.trace"), "--predictor", str(path)]) == 1
    assert "reads router_input" in capsys.readouterr().err


def test_tune_tries_a_learned_predictor_and_writes_it_into_the_profile(tmp_path, capsys):
    trace = synthetic_trace(T=1200, L=3, E=8, K=2, D=16)
    trace.metadata["config"] = json.dumps({"dim": 4096, "n_layers": 3, "n_heads": 32, "n_kv_heads": 8,
                                           "head_dim": 128, "ffn_dim": 14336, "num_experts": 8, "top_k": 2,
                                           "vocab_size": 32000})
    pred = tmp_path / "s.pred"
    save_trace(tmp_path / "s.trace", trace)
    assert main(["train-predictor", str(tmp_path / "s.trace"), "--out", str(pred), "--steps", "300"]) == 0
    capsys.readouterr()
    config = model_shape(trace)
    best, default, out = tune(trace, config, 3 * 2**30, dict(DEFAULT_HARDWARE), 2**30, log=lambda *a: None,
                              predictors=[str(pred)])
    learned = [c for c in out if c.predictor == str(pred)]
    recorded = [c for c in out if c.prefetch and not c.predictor]
    # the calibrated file's predictions rank every expert, as the engine's prefetcher ranks them for `speculate`
    assert replayed(trace, str(pred)).predicted.shape[2] == 8
    assert {1, 2, 8} <= {c.width for c in learned if not c.decided} and any(c.decided for c in learned)
    assert learned and not recorded  # the synthetic trace recorded no predictions of its own
    assert all(c.prefetch == 1 for c in learned)
    same = next(c for c in learned if c.slots == default.slots and c.policy == "lru" and c.miss_policy == "fetch"
                and c.precision == default.precision and c.attention == default.attention)
    assert same.hit_rate > 0.95 > default.hit_rate + 0.3  # the learned routing is what the cache needed
    held = rescore(slice_trace(trace, 900, 1200), config, dict(DEFAULT_HARDWARE), same)
    assert held.hit_rate > 0.9  # replayed from the held-out tokens' own hidden states (never fitted on)
    profile = winner_profile(same, load_profile("24gb"), 3 * 2**30, 2**30, dict(DEFAULT_HARDWARE), "s.trace")
    assert f'predictor = "{pred}"' in profile and "prefetch = 1" in profile
    assert main(["tune", "--trace", str(tmp_path / "s.trace"), "--budget", "3GB", "--reserve", "1GB",
                 "--predictor", str(tmp_path / "missing.pred")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_the_demos_ship_a_learned_predictor_that_convert_carries(tmp_path):
    for name in ("demo", "demo-fine"):
        engine = Engine.load(resolve_model(name), EngineOptions(cache_experts=4 if name == "demo" else 8))
        assert isinstance(engine.model.prefetcher.predictor, LearnedPredictor)
    assert main(["convert", "--model", "demo", "--out", str(tmp_path / "packed"), "--experts", "int8"]) == 0
    assert (tmp_path / "packed" / FILE_NAME).read_bytes() == (resolve_model("demo") / FILE_NAME).read_bytes()
    packed = Engine.load(tmp_path / "packed", EngineOptions(cache_experts=2))
    assert isinstance(packed.model.prefetcher.predictor, LearnedPredictor)


def test_a_malformed_predictor_file_is_refused_with_the_reason(tmp_path):
    def mlp(hidden=4, dim=16, experts=8):
        return {"w1": torch.zeros(hidden, dim), "b1": torch.zeros(hidden), "w2": torch.zeros(experts, hidden),
                "b2": torch.zeros(experts)}

    save_predictor(tmp_path / "ok", [mlp() for _ in range(3)], 1, {})
    assert load_predictor(tmp_path / "ok", 3, 16, 8).lead == 1
    assert load_predictor(tmp_path / "ok", 3, 16, 8).input == "hidden"  # a file from before `input`
    save_predictor(tmp_path / "input", [mlp() for _ in range(3)], 1, {"input": "logits"})
    with pytest.raises(UserError, match="reads 'logits'"):
        load_predictor(tmp_path / "input", 3, 16, 8)
    save_predictor(tmp_path / "shapes", [mlp(), mlp(hidden=5), mlp()], 1, {})
    with pytest.raises(UserError, match="layer 1's weights have shapes"):
        load_predictor(tmp_path / "shapes", 3, 16, 8)
    save_predictor(tmp_path / "lead", [mlp() for _ in range(3)], 3, {})
    with pytest.raises(UserError, match="allow 1 to 2"):
        load_predictor(tmp_path / "lead", 3, 16, 8)
    with pytest.raises(UserError, match="trained for 3 MoE layers, dim 16, 8 experts"):
        load_predictor(tmp_path / "ok", 4, 16, 8)
    # deeper leads: named in `leads` but absent, out of order, or a bad number
    from safetensors.torch import save_file

    rows = {f"rows.{r}.{k}": v for r in range(3) for k, v in mlp().items()}
    for leads, why in (("1,2", "not a train-predictor file"), ("2,1", "each once, nearest first"),
                       ("1,x", "not a train-predictor file")):
        save_file(rows, str(tmp_path / "deep"), metadata={"kind": "learned", "lead": "1", "leads": leads, "rows": "3"})
        with pytest.raises(UserError, match=why):
            load_predictor(tmp_path / "deep", 3, 16, 8)

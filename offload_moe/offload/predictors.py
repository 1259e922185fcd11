"""Which experts a row will want before it asks: the predictors behind prefetch.

Every predictor answers one question. For token t and MoE row l it scores each expert from an
earlier hidden state of row l - lead of the same token or, for the first rows (l < lead), of row
l - lead + L of the token processed before (cross-token: layer 0 is predicted too). Which state is
its `input` (a trace's tensor of that name holds it, planning/trace.py):
  hidden        the one entering the row (before its attention);
  router_input  the row's router input (after its attention, normed). The prefetch is issued after the
                row's routing either way (after its demand copies), so reading it later costs no lead, and
                it predicts better (bench/bench_predictor_input.py; BENCHMARKS.md).
`lead` is the prefetch depth N; the prefetch for (t, l) is issued at that earlier row, so its copy
has `lead` rows of compute to land in. The prefetcher (prefetch.py) copies the `width` best-scored
experts (default: top-k; at most the row's slots).

  router   row l's own router (its ffn norm, gate and bias) on the earlier hidden state: its top-k
           as the router picks them (sigmoid and grouped routers' own choice, bias and groups
           included), then the other experts by router score. Nothing to train.
  learned  a two-layer MLP per row (D -> H -> E), trained by `train-predictor` on a trace recorded
           with hidden states (`profile --hidden-states`), loaded from its file (`--predictor
           FILE`; its metadata `input` names what it reads, router_input by default, hidden for a
           file without one). Small enough to stay resident (D*H + H*E weights per row) and one
           matmul pair per row and token.
The engine's default (`auto`): the model folder's `predictor.safetensors` when there is one (the
demos ship theirs), else the router, which needs no file and no trace. Why: the learned one makes more
expert uses resident on arrival on held-out routing (`bench/bench_prediction.py`; BENCHMARKS.md).

Shape legend: T tokens, D dim, H predictor hidden size, E experts, L rows, P prefetch width.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..atomic import write_safetensors_atomic
from ..errors import UserError
from .states import HIDDEN

FILE_NAME = "predictor.safetensors"  # looked for in the model folder by `--predictor auto`


def source_of(target: int, lead: int, rows: int) -> tuple[int, bool]:
    """The row whose entering hidden state predicts row `target`, and whether it is the previous
    token's (cross-token)."""
    src = target - lead
    return (src + rows, True) if src < 0 else (src, False)


def targets_of(row: int, lead: int, rows: int) -> list[tuple[int, bool]]:
    """The rows predicted at `row`'s entry: (target, for the next token?). Each row is predicted once per
    token; 1 <= lead < rows (a row predicting itself for the next token would evict its own experts)."""
    out = []
    if row + lead < rows:
        out.append((row + lead, False))
    if row + lead >= rows:
        out.append((row + lead - rows, True))
    return out


class RouterPredictor:
    """The target row's own router on an earlier hidden state."""

    name = "router"
    input = "hidden"  # the target row's own ffn norm comes first: the state before any row's norm

    calibration = None  # no hit probabilities: the prefetcher copies its fixed width

    def __init__(self, model, lead: int):
        self.model, self.lead = model, lead
        # sigmoid and grouped routers pick within groups, which their scores alone do not show
        self.own_pick = model.config.router in ("sigmoid", "grouped_softmax")

    def rank(self, target: int, h: torch.Tensor, width: int) -> torch.Tensor:
        """h [T, D] -> the `width` best experts [T, P]: the router's own top-k first, then by router score
        (one router pass where the scores rank them all)."""
        if not self.own_pick:
            return ranked(None, self.model.router_scores(target, h), width)
        first = self.model.predict(target, h)  # [T, K]
        if width <= first.shape[1]:
            return first[:, :width]
        return ranked(first, self.model.router_scores(target, h), width)


class LearnedPredictor:
    """Per row a two-layer MLP, scores = w2 gelu(w1 h + b1) + b2 (the input normalisation folded into w1, b1)."""

    name = "learned"

    def __init__(self, weights: list[dict[str, torch.Tensor]], lead: int, meta: dict[str, str],
                 calibration: np.ndarray | None = None, deeper: list[LearnedPredictor] | None = None):
        self.weights, self.lead, self.meta = weights, lead, meta
        self.input = meta.get("input", "hidden")  # the trace tensor it reads (files before `input` read hidden)
        self.calibration = calibration  # [L, P] per row and rank, the chance the row uses it (speculate.calibrate)
        # calibrated predictors further ahead (leads > lead, nearest first): the prefetcher decides their copies
        # too, each only into the link's gap before a nearer guess (speculate's `better_s`): the depth adapts
        self.deeper = deeper or []

    def logits(self, target: int, h: torch.Tensor) -> torch.Tensor:
        w = self.weights[target]
        return F.linear(F.gelu(F.linear(h.to(w["w1"].dtype), w["w1"], w["b1"])), w["w2"], w["b2"])  # [T, E]

    def rank(self, target: int, h: torch.Tensor, width: int) -> torch.Tensor:
        """h [T, D] -> the `width` best-scored experts [T, P]."""
        return torch.topk(self.logits(target, h), width, dim=-1).indices

    def to(self, device: torch.device) -> LearnedPredictor:
        """On the model's device, in float32 whatever the model's dtype: the folded input standardisation
        can make weights and biases too large for float16, and the MLP is tiny."""
        self.weights = [{k: v.to(device, torch.float32) for k, v in w.items()} for w in self.weights]
        for d in self.deeper:
            d.to(device)
        return self

    def from_lead(self, lead: int) -> LearnedPredictor:
        """This predictor for `--prefetch lead` (one of its leads): calibrated, that lead with every deeper one
        (the engine decides all their copies, a deeper one's only into the link's gaps); without a calibration,
        that lead alone (a fixed width)."""
        chosen = [p for p in (self, *self.deeper) if p.lead >= lead]
        near = chosen[0]
        return LearnedPredictor(near.weights, near.lead, near.meta, near.calibration,
                                chosen[1:] if near.calibration is not None else [])


def ranked(first: torch.Tensor | None, scores: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` experts to prefetch, best first: `first` [T, K] (the router's own pick) when given,
    then the rest by score [T, E]. -> [T, P]"""
    if first is None:
        return torch.topk(scores, width, dim=-1).indices
    if width <= first.shape[1]:
        return first[:, :width]
    rest = scores.scatter(1, first, float("-inf"))  # the pick goes first, once
    return torch.cat([first, torch.topk(rest, width - first.shape[1], dim=-1).indices], dim=1)


def save_predictor(path: str | os.PathLike, weights: list[dict[str, torch.Tensor]], lead: int,
                   meta: dict[str, str], calibration: np.ndarray | None = None,
                   deeper: Sequence[LearnedPredictor] = ()) -> None:
    """The predictor file; `calibration` [L, P] (`speculate.calibrate` on routing it was not fitted on) lets
    the prefetcher weigh each copy's cost (`speculate.decide`) instead of copying a fixed width. `deeper`:
    calibrated predictors of further leads, under `lead{N}.` (metadata `leads`: every lead, nearest first)."""
    parts = [("", weights, calibration)] + [(f"lead{d.lead}.", d.weights, d.calibration) for d in deeper]
    tensors = {}
    for prefix, rows, table in parts:
        tensors |= {f"{prefix}rows.{r}.{k}": v.contiguous() for r, w in enumerate(rows) for k, v in w.items()}
        if table is not None:
            tensors[f"{prefix}calibration"] = torch.from_numpy(np.asarray(table, np.float32))
    leads = ",".join(str(x) for x in [lead, *(d.lead for d in deeper)])
    write_safetensors_atomic(path, tensors, metadata={**meta, "kind": "learned", "lead": str(lead), "leads": leads,
                                                      "rows": str(len(weights))})


def load_predictor(path: str | os.PathLike, rows: int, dim: int, experts: int) -> LearnedPredictor:
    """Read a `train-predictor` file and check it fits the model (rows, D, E)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"predictor {p} does not exist (give a file written by train-predictor, or 'router')")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"predictor {p} is not a safetensors file ({exc})") from None
    bad = UserError(f"predictor {p} is not a train-predictor file (no lead, rows or row weights)")
    try:
        n = int(meta["rows"])
        leads = [int(x) for x in meta.get("leads", meta["lead"]).split(",")]
    except (KeyError, ValueError):
        raise bad from None
    if meta.get("input", "hidden") not in HIDDEN:
        raise UserError(f"predictor {p} reads {meta['input']!r}; this version reads {' or '.join(HIDDEN)}")
    if leads != sorted(set(leads)) or not 1 <= leads[0] <= leads[-1] < rows:
        raise UserError(f"predictor {p} predicts {', '.join(map(str, leads))} layers ahead; this model's {rows} MoE "
                        f"layers allow 1 to {rows - 1}, each once, nearest first")
    prefixes = ["", *(f"lead{d}." for d in leads[1:])]  # the nearest lead's keys have none
    try:
        parts = [[{k: tensors[f"{prefix}rows.{r}.{k}"].float() for k in ("w1", "b1", "w2", "b2")} for r in range(n)]
                 for prefix in prefixes]
    except KeyError:
        raise bad from None
    if meta.get("kind") != "learned":
        raise UserError(f"predictor {p}: unknown kind {meta.get('kind')!r}")
    if not n:
        raise UserError(f"predictor {p} holds no layers")
    made = []
    for lead, weights, prefix in zip(leads, parts, prefixes, strict=True):
        _check_rows(p, weights, (rows, dim, experts))
        calibration = tensors.get(f"{prefix}calibration")
        if calibration is not None and (calibration.ndim != 2 or calibration.shape[0] != rows):
            raise UserError(f"predictor {p}: its calibration has shape {list(calibration.shape)}, not [{rows}, P]")
        if prefix and calibration is None:
            raise UserError(f"predictor {p}: its lead {lead} has no calibration (a deeper lead needs one)")
        table = None if calibration is None else calibration.double().numpy()
        made.append(LearnedPredictor(weights, lead, meta, table))
    made[0].deeper = made[1:]
    return made[0]


def _check_rows(p: Path, weights: list[dict[str, torch.Tensor]], want: tuple[int, int, int]) -> None:
    """That one lead's MLPs fit the model: want (rows, D, E)."""
    rows, dim, experts = want
    got = (len(weights), weights[0]["w1"].shape[-1], weights[0]["w2"].shape[0])
    if got != want:
        raise UserError(f"predictor {p} was trained for {got[0]} MoE layers, dim {got[1]}, {got[2]} experts; "
                        f"this model has {rows}, {dim}, {experts}")
    hidden = weights[0]["b1"].shape
    for r, w in enumerate(weights):
        shapes = [tuple(w[k].shape) for k in ("w1", "b1", "w2", "b2")]
        if shapes != [(*hidden, dim), hidden, (experts, *hidden), (experts,)]:
            raise UserError(f"predictor {p}: layer {r}'s weights have shapes {shapes}, not an MLP {dim} -> "
                            f"{hidden[0] if hidden else '?'} -> {experts}")


def make_predictor(kind: str, model, lead: int, device: torch.device):
    """'router' or a predictor file (`--predictor`, its `auto` resolved by the load plan). `--prefetch` (`lead`)
    must be one of the leads a learned predictor was trained for; a calibrated one decides its deeper ones too
    (`LearnedPredictor.from_lead`)."""
    c = model.config
    if kind == "router":
        return RouterPredictor(model, lead)
    learned = load_predictor(kind, c.n_moe_layers, c.dim, c.num_experts)
    leads = [learned.lead, *(d.lead for d in learned.deeper)]
    if lead not in leads:
        raise UserError(f"predictor {kind} predicts {', '.join(map(str, leads))} layer(s) ahead; --prefetch {lead} "
                        f"asks for {lead} (use --prefetch {leads[0]}, or --predictor router)")
    return learned.from_lead(lead).to(device)


def replayed(trace, predictor, width: int | None = None):
    """`trace` with the predictions `predictor` (a learned one, or a file path of one, or a router) makes from
    its hidden states (the tensor named by the predictor's `input`), `width` per row ([T, L, P], -1 where none:
    cross-token rows of the first token; None: as wide as the engine's prefetcher ranks them, every expert a
    calibration covers, else top-k), as the engine makes them decoding one token at a time; `predicted_after`
    from the last token; metadata `prefetch_lead` the predictor's lead. A calibrated learned one's deeper leads
    are replayed too, as tensors `predicted_lead{N}` [T, L, P], `predicted_after_lead{N}` [L, P] and
    `calibration_lead{N}` [L, E] (the timed replay's `timed.deeper_of`), and its calibration replaces the
    trace's."""
    states = [trace.tensors[k] for k in HIDDEN if k in trace.tensors]
    if not states:
        raise UserError("--predictor needs a trace with hidden states: record it with profile --hidden-states")
    _, L, D = states[0].shape
    if isinstance(predictor, str | os.PathLike):
        predictor = load_predictor(predictor, L, D, trace.num_experts)
    if predictor.input not in trace.tensors:
        raise UserError(f"the predictor reads {predictor.input}, which the trace does not hold: record it again with "
                        "profile --hidden-states")
    hidden = torch.from_numpy(trace.tensors[predictor.input].astype(np.float32))  # [T, L, D]
    calibration = getattr(predictor, "calibration", None)
    if width is None:
        width = trace.top_k if calibration is None else calibration.shape[1]
    if not 1 <= width <= trace.num_experts:
        raise UserError(f"a prediction width must be from 1 to {trace.num_experts}, not {width}")
    # the trace's own predictor's calibration and deeper leads go: these predictions are `predictor`'s
    deeper_keys = ("predicted_lead", "predicted_after_lead", "calibration_lead")
    tensors = {k: v for k, v in trace.tensors.items() if k != "calibration" and not k.startswith(deeper_keys)}
    predicted, tensors["predicted_after"] = _ranked_all(predictor, hidden, width)
    if calibration is not None:
        tensors["calibration"] = calibration
        for d in predictor.deeper:
            tensors[f"predicted_lead{d.lead}"], tensors[f"predicted_after_lead{d.lead}"] = _ranked_all(d, hidden, width)
            tensors[f"calibration_lead{d.lead}"] = d.calibration
    return replace(trace, predicted=predicted, metadata={**trace.metadata, "prefetch_lead": str(predictor.lead)},
                   tensors=tensors)


def _ranked_all(predictor, hidden: torch.Tensor, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One predictor's `width` best experts at every token and row, as the engine predicts them decoding:
    [T, L, P] (-1 where none) and the last token's for a next token [L, P]."""
    T, L, _ = hidden.shape
    predicted = np.full((T, L, width), -1, np.int32)
    after = np.full((L, width), -1, np.int32)
    with torch.no_grad():
        for row in range(L):
            src, cross = source_of(row, predictor.lead, L)
            top = predictor.rank(row, hidden[:, src], width).numpy()  # [T, P]
            if cross:  # token t's from token t - 1's hidden state; the last token's for a next token
                predicted[1:, row], after[row] = top[:-1], top[-1]
            else:
                predicted[:, row] = top
    return predicted, after

"""Recording a run's routing: the tap the model calls at each MoE row, feeding a `TraceRecorder`.

`start_tap` sets it up for `Engine.start_trace`: with the engine's prefetcher when it has one (its
predictions are recorded), else with a prefetcher of its own that records what a prefetch would fetch without
fetching anything: the engine's predictor (`--predictor`: the model folder's learned one by default) at its
`--prefetch` lead and widths when prefetch is on but nothing was left to prefetch (every expert resident), so
a trace replays the engine as it runs at any residency; with prefetch off, the router one row ahead, top-k wide.
The trace's metadata `prefetch` is the engine's --prefetch (what `simulate` replays by default).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .modeling.transformer import Transformer
from .offload.predictors import RouterPredictor, make_predictor
from .offload.prefetch import Prefetcher
from .planning.trace import TraceRecorder


def start_tap(model: Transformer, model_name: str, hidden: bool, prefetch: int = 0, predictor: str = "router",
              widths: list[int] | None = None, device: torch.device | None = None) -> RoutingTap:
    """A tap over a new recorder for `model`; `hidden`: record the hidden state entering each MoE row and its router
    input too.
    `prefetch`, `predictor`, `widths`, `device`: the engine's --prefetch, its resolved --predictor, its widths
    per row and its device, for the predictions recorded where it has no prefetcher (the module docstring)."""
    c, prefetcher = model.config, model.prefetcher
    own = None
    if prefetcher is None:
        lead = min(prefetch, c.n_moe_layers - 1)
        own = (Prefetcher(model, make_predictor(predictor, model, lead, device), widths) if lead and widths
               else Prefetcher(model, RouterPredictor(model, 1), [c.top_k] * c.n_moe_layers))
    used = prefetcher or own
    # a calibrated predictor feeding a cache ranks every expert it calibrated (`speculate` chooses among them)
    calibration = used.predictor.calibration if used.cache is not None else None
    width = max([*used.widths, *([] if calibration is None else [calibration.shape[1]])])
    recorder = TraceRecorder(c.n_moe_layers, c.top_k, c.num_experts, model_name,
                             metadata={"config": json.dumps(c.to_dict()), "prefetch_lead": str(used.predictor.lead),
                                       "prefetch": str(prefetch)},
                             width=width, hidden=hidden,
                             calibration=None if calibration is None else np.asarray(calibration))
    return RoutingTap(model, recorder, own)


class RoutingTap:
    """Feeds a TraceRecorder from inside the model: at each row's entry and at its router, the hidden states (when
    recorded) and the predictions made there: the engine's prefetcher's, or with prefetch off a one-row-ahead
    router's of width top-k (`own`: what such a prefetch would fetch); at each router, the experts
    chosen. A prediction for the next token's row is kept for the next forward's first token(s)."""

    def __init__(self, model: Transformer, recorder: TraceRecorder, own: Prefetcher | None):
        self.model, self.recorder, self.own = model, recorder, own
        self.now: dict[int, torch.Tensor] = {}  # row -> [T, P], for this forward
        self.next: dict[int, torch.Tensor] = {}  # row -> [T, P], made for the next forward
        self.carried: dict[int, torch.Tensor] = {}  # the previous forward's `next`

    def enter(self, row: int, h: torch.Tensor, decode: bool) -> None:
        if row == 0:
            self.carried, self.next = self.next, {}
        self.recorder.enter(row, h)
        if self.own is not None and self.own.input == "hidden":
            self.own(row, h, decode)

    def router_input(self, row: int, x: torch.Tensor, decode: bool) -> None:
        self.recorder.router_input(row, x)
        if self.own is not None and self.own.input == "router_input":
            self.own(row, x, decode)

    def predicted(self, target: int, next_token: bool, experts: torch.Tensor) -> None:
        (self.next if next_token else self.now)[target] = experts

    def chosen(self, row: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
        pred, carried = self.now.pop(row, None), self.carried.pop(row, None)
        if carried is not None:  # the previous forward's last token(s) predicted this one's first
            T = idx.shape[0]
            pred = carried if carried.shape[0] == T else torch.cat([carried[-1:], carried.new_full(
                (T - 1, carried.shape[1]), -1)])
        self.recorder.add(row, idx, weights, pred)

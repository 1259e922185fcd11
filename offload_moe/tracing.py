"""Recording a run's routing: the tap the model calls at each MoE row, feeding a `TraceRecorder`.

`start_tap` sets it up for `Engine.start_trace`: with the engine's prefetcher when it has one (its
predictions are recorded), else with a one-row-ahead router of width top-k of its own, which records what such
a prefetch would fetch without fetching anything.
"""

from __future__ import annotations

import json

import torch

from .modeling.transformer import Transformer
from .offload.predictors import RouterPredictor
from .offload.prefetch import Prefetcher
from .planning.trace import TraceRecorder


def start_tap(model: Transformer, model_name: str, hidden: bool) -> RoutingTap:
    """A tap over a new recorder for `model`; `hidden`: record the hidden state entering each MoE row too."""
    c, prefetcher = model.config, model.prefetcher
    own = None if prefetcher else Prefetcher(model, RouterPredictor(model, 1), [c.top_k] * c.n_moe_layers)
    lead, widths = (prefetcher or own).lead, (prefetcher or own).widths
    recorder = TraceRecorder(c.n_moe_layers, c.top_k, c.num_experts, model_name,
                             metadata={"config": json.dumps(c.to_dict()), "prefetch_lead": str(lead)},
                             width=max(widths), hidden=hidden)
    return RoutingTap(model, recorder, own)


class RoutingTap:
    """Feeds a TraceRecorder from inside the model: at each row's entry, the hidden state (when recorded)
    and the predictions made there: the engine's prefetcher's, or with prefetch off a one-row-ahead
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
        if self.own is not None:
            self.own(row, h, decode)

    def predicted(self, target: int, next_token: bool, experts: torch.Tensor) -> None:
        (self.next if next_token else self.now)[target] = experts

    def chosen(self, row: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
        pred, carried = self.now.pop(row, None), self.carried.pop(row, None)
        if carried is not None:  # the previous forward's last token(s) predicted this one's first
            T = idx.shape[0]
            pred = carried if carried.shape[0] == T else torch.cat([carried[-1:], carried.new_full(
                (T - 1, carried.shape[1]), -1)])
        self.recorder.add(row, idx, weights, pred)

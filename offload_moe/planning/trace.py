"""Routing traces: which experts every token chose at every layer, saved for offline study.

A trace lets `replay.py` replay one real workload under any eviction policy and cache size
without loading the model again. It is a safetensors file:

  experts    int32   [T, L, K]  the K experts the router chose, per token (processing order) and layer,
                                in rank order
  weights    float32 [T, L, K]  their routing weights
  predicted  int32   [T, L, P]  the experts a prefetch for token t at layer l would fetch, best first,
                                as the engine's predictor ranked them (predictors.py: made
                                `prefetch_lead` layers earlier, layer 0 from the previous token);
                                -1 where there is none or to pad. With prefetch off: the router's
                                one-layer-ahead top-k.

and, optionally (`profile --hidden-states`), the hidden states a predictor learns from (HIDDEN):

  hidden        float16 [T, L, D]  the hidden state entering each layer (before its attention norm)
  router_input  float16 [T, L, D]  each layer's router input: its FFN's normed input, after the attention

and `predicted_after` int32 [L, P] when the last token predicted a next token's layers (the engine
prefetched them; the simulator does too, after the last token), and `calibration` float32 [L, P] when the engine
prefetched with a calibrated predictor (`speculate.calibrate`; a run whose prefetcher fed a cache, not one where the
trace's own predictor only predicts): then `predicted` holds its whole ranking, the engine copied only what
`speculate` chose, and `simulate --timed` replays that choice (the untimed replay, with no clock to decide by,
copies each row's first `slots` of the ranking).

and string metadata `num_experts`, `top_k`, `num_layers`, `model` (and `prefetch_lead`). Other tensors (for example
`prompt_lengths` int64 [P]) and other metadata (for example `config`, the model shape as JSON)
travel along untouched.

Shape legend: T tokens, L layers, K top-k, E experts, P predicted per layer, D dim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from ..atomic import write_safetensors_atomic
from ..errors import UserError
from ..offload.states import HIDDEN

if TYPE_CHECKING:  # the recorder imports torch when it runs: reading a trace (`simulate`) needs none
    import torch

ROUTING = {"experts": np.int32, "weights": np.float32, "predicted": np.int32}
SHAPE_KEYS = ("num_experts", "top_k", "num_layers")
CORE_METADATA = (*SHAPE_KEYS, "model")


@dataclass
class Trace:
    """One recorded workload. The arrays are numpy so the simulator indexes them without torch."""

    experts: np.ndarray  # int32 [T, L, K]
    weights: np.ndarray  # float32 [T, L, K]
    predicted: np.ndarray  # int32 [T, L, P], -1 where no prediction exists
    num_experts: int
    top_k: int
    num_layers: int
    model: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # other string metadata, e.g. "config"
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # other tensors, e.g. "prompt_lengths"

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])


GROUPINGS = ("forward_tokens", "prompt_lengths")  # extra tensors of tokens per forward pass [F] / per prompt [P]


def group_ends(trace: Trace, key: str) -> np.ndarray | None:
    """Where the groups of the grouping tensor `key` end, as token indices [G] (the last is T); None when
    the trace has no such tensor or it does not group all T tokens in order."""
    sizes = trace.tensors.get(key)
    if sizes is None or sizes.ndim != 1 or sizes.dtype.kind not in "iu" or (sizes < 1).any() \
            or int(sizes.sum()) != trace.num_tokens:
        return None
    return np.cumsum(sizes)


def slice_trace(trace: Trace, start: int, stop: int) -> Trace:
    """Tokens [start, stop) of `trace`. A grouping tensor (GROUPINGS) keeps the groups in between where
    both ends fall between its groups, and is dropped otherwise; the hidden states (HIDDEN) keep their tokens;
    `calibration` is kept (it is the predictor's); other extra tensors are dropped, as nothing says how they index
    tokens."""
    tensors = {k: trace.tensors[k] for k in ("calibration",) if k in trace.tensors}  # the predictor's, not per token
    tensors |= {k: trace.tensors[k][start:stop] for k in HIDDEN if k in trace.tensors}
    for key in GROUPINGS:
        ends = group_ends(trace, key)
        if ends is None:
            continue
        edges = np.concatenate([[0], ends])  # [G+1]
        if start in edges and stop in edges:
            first, last = np.searchsorted(edges, [start, stop])
            tensors[key] = trace.tensors[key][first:last].copy()
    return replace(trace, experts=trace.experts[start:stop], weights=trace.weights[start:stop],
                   predicted=trace.predicted[start:stop], metadata=dict(trace.metadata), tensors=tensors)


def join_traces(parts: list[Trace]) -> Trace:
    """Traces of one model (same L, K, E, prediction width), one after another, as one workload: the first's
    metadata; each hidden state (HIDDEN) that every part has; other extra tensors dropped (they describe one part)."""
    first = parts[0]
    arrays = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ROUTING}  # parts x [T_i, L, .] -> [T, L, .]
    tensors = {k: np.concatenate([p.tensors[k] for p in parts]) for k in HIDDEN if all(k in p.tensors for p in parts)}
    return Trace(**arrays, num_experts=first.num_experts, top_k=first.top_k, num_layers=first.num_layers,
                 model=first.model, metadata=dict(first.metadata), tensors=tensors)


def check_trace(trace: Trace, name: str = "trace") -> None:
    """Raise UserError unless `trace` is well formed. Shared by save and load so that a file this
    module writes always loads, and a hand-made or damaged file fails with the reason, not later
    inside the simulator with an index error."""
    E, K, L = trace.num_experts, trace.top_k, trace.num_layers
    if min(E, K, L) < 1:
        raise UserError(f"{name}: num_experts, top_k and num_layers must be positive, not {E}, {K}, {L}")
    if K > E:
        raise UserError(f"{name}: top_k {K} exceeds num_experts {E}")
    shape = None
    for key, dtype in ROUTING.items():
        arr = getattr(trace, key)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise UserError(f"{name}: tensor '{key}' must be {np.dtype(dtype).name}, not {got}")
        if arr.ndim != 3:
            raise UserError(f"{name}: tensor '{key}' must be [tokens, layers, top_k], not {list(arr.shape)}")
        if shape is None:
            shape = arr.shape
        elif arr.shape[:2] != shape[:2] or (key == "weights" and arr.shape != shape):
            raise UserError(f"{name}: tensor '{key}' has shape {list(arr.shape)}, 'experts' has {list(shape)}")
    if shape[1:] != (L, K):
        raise UserError(f"{name}: tensors are [tokens, {shape[1]}, {shape[2]}] but the metadata says "
                        f"num_layers={L}, top_k={K}")
    ex, pred = trace.experts, trace.predicted
    if ex.size and (ex.min() < 0 or ex.max() >= E):
        raise UserError(f"{name}: 'experts' holds ids from {ex.min()} to {ex.max()}; they must lie in [0, {E})")
    if pred.size and (pred.min() < -1 or pred.max() >= E):
        raise UserError(f"{name}: 'predicted' holds ids from {pred.min()} to {pred.max()}; they must lie in "
                        f"[0, {E}) or be -1")
    for key, arr in (("experts", ex), ("predicted", pred)):
        ranked = np.sort(arr, axis=-1)  # [T, L, K]
        dup = (ranked[..., 1:] == ranked[..., :-1]) & (ranked[..., 1:] >= 0)  # [T, L, K-1]
        if dup.any():
            t, layer, _ = np.argwhere(dup)[0]
            raise UserError(f"{name}: '{key}' names one expert twice for token {t} at layer {layer}: "
                            f"{arr[t, layer].tolist()}")
    for key in HIDDEN:
        hidden = trace.tensors.get(key)
        if hidden is not None and (hidden.dtype != np.float16 or hidden.ndim != 3 or hidden.shape[:2] != shape[:2]):
            raise UserError(f"{name}: tensor '{key}' must be float16 [tokens, layers, dim] = [{shape[0]}, {L}, D], "
                            f"not {hidden.dtype} {list(hidden.shape)}")
    if not np.isfinite(trace.weights).all():
        raise UserError(f"{name}: 'weights' holds NaN or infinite values")


def save_trace(path: str | os.PathLike, trace: Trace) -> None:
    """Write `trace` so that a reader (or a crash) never sees half a trace (`atomic.write_safetensors_atomic`)."""
    check_trace(trace, str(path))
    clash = set(trace.tensors) & set(ROUTING)
    if clash:
        raise UserError(f"cannot write {path}: extra tensors may not be named {', '.join(sorted(clash))}")
    tensors = {**{k: np.ascontiguousarray(v) for k, v in trace.tensors.items()},
               **{k: np.ascontiguousarray(getattr(trace, k)) for k in ROUTING}}
    metadata = {**trace.metadata, "num_experts": str(trace.num_experts), "top_k": str(trace.top_k),
                "num_layers": str(trace.num_layers), "model": trace.model}
    write_safetensors_atomic(path, tensors, metadata)  # it checks the target: a folder, no folder


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace; every defect is a UserError that names the file and the problem."""
    source = Path(path)
    if not source.exists():
        raise UserError(f"trace {source} does not exist")
    if not source.is_file():
        raise UserError(f"trace {source} is not a file")
    try:
        with safe_open(str(source), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            names = set(f.keys())
            missing = [k for k in ROUTING if k not in names]
            if missing:
                raise UserError(f"trace {source} lacks tensor(s) {', '.join(missing)}; a trace holds "
                                f"{', '.join(ROUTING)}")
            arrays = {}
            for k in sorted(names):
                try:
                    arrays[k] = f.get_tensor(k)
                except TypeError:  # numpy has no such dtype (bfloat16)
                    raise UserError(f"trace {source}: tensor '{k}' is {f.get_slice(k).get_dtype()}, which numpy "
                                    "cannot read; 'experts' and 'predicted' are int32, 'weights' float32") from None
    except SafetensorError as exc:
        raise UserError(f"trace {source} is not a safetensors file ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read trace {source}: {exc.strerror or exc}") from None
    absent = [k for k in CORE_METADATA if k not in metadata]
    if absent:
        raise UserError(f"trace {source} lacks metadata {', '.join(absent)}")
    shape = {}
    for key in SHAPE_KEYS:
        try:
            shape[key] = int(metadata[key])
        except ValueError:
            raise UserError(f"trace {source}: metadata {key}={metadata[key]!r} is not an integer") from None
    trace = Trace(
        experts=arrays.pop("experts"),
        weights=arrays.pop("weights"),
        predicted=arrays.pop("predicted"),
        model=metadata["model"],
        metadata={k: v for k, v in metadata.items() if k not in CORE_METADATA},
        tensors=arrays,
        **shape,
    )
    check_trace(trace, f"trace {source}")
    return trace


class TraceRecorder:
    """Collects the routing of every forward pass while the engine runs.

    The engine calls `add` once per layer per forward pass, layers 0..L-1 in order (and `enter` and
    `router_input` before, for the hidden states, when they are recorded). Each call keeps a CPU copy of a few
    small tensors; the stacking into [T_total, L, ...] happens once, in `finish`, so recording costs
    next to nothing on the decode path (hidden states cost two device-to-host copies per layer).
    """

    def __init__(self, num_layers: int, top_k: int, num_experts: int, model_name: str,
                 metadata: dict[str, str] | None = None, width: int | None = None, hidden: bool = False,
                 calibration: np.ndarray | None = None):
        """`width`: most experts predicted per layer (P; default top_k); `hidden`: record hidden states;
        `calibration` [L, P]: the predictor's (`speculate.calibrate`), kept with the trace."""
        self.calibration = calibration
        self.num_layers, self.top_k, self.num_experts = num_layers, top_k, num_experts
        self.width = width or top_k
        self.model_name = model_name
        self.metadata = dict(metadata or {})
        self.hidden = hidden
        self._layers: list[tuple[torch.Tensor, ...]] = []  # the forward in progress
        self._hidden: dict[str, list[torch.Tensor]] = {k: [] for k in HIDDEN}  # the forward in progress, [T, D] each
        self._chunks: list[tuple[torch.Tensor, ...]] = []  # finished forwards, [T, L, ...]

    def enter(self, layer: int, h: torch.Tensor) -> None:
        """The hidden state h [T, D] entering `layer` (kept only when recording hidden states)."""
        self._keep("hidden", h)

    def router_input(self, layer: int, x: torch.Tensor) -> None:
        """`layer`'s router input x [T, D] (kept only when recording hidden states)."""
        self._keep("router_input", x)

    def _keep(self, key: str, h: torch.Tensor) -> None:
        if self.hidden:
            import torch

            self._hidden[key].append(h.detach().to("cpu", torch.float16, copy=True))

    def add(self, layer: int, experts: torch.Tensor, weights: torch.Tensor,
            predicted: torch.Tensor | None = None) -> None:
        """Record one layer of the current forward: experts, weights [T, K], predicted [T, P] with
        P <= width, -1 padded (None when no prediction was made)."""
        import torch

        if layer != len(self._layers):
            raise RuntimeError(f"TraceRecorder.add: expected layer {len(self._layers)}, got {layer}")
        T = experts.shape[0]
        if experts.shape != (T, self.top_k) or weights.shape != experts.shape:
            raise RuntimeError(f"TraceRecorder.add: experts {tuple(experts.shape)} and weights "
                               f"{tuple(weights.shape)} must both be [T, {self.top_k}]")
        if self._layers and T != self._layers[0][0].shape[0]:
            raise RuntimeError(f"TraceRecorder.add: layer {layer} has {T} tokens, layer 0 had "
                               f"{self._layers[0][0].shape[0]}")
        pred = torch.full((T, self.width), -1, dtype=torch.int32)
        if predicted is not None:
            if predicted.shape[0] != T or predicted.shape[1] > self.width:
                raise RuntimeError(f"TraceRecorder.add: predicted {tuple(predicted.shape)} must be [{T}, <= "
                                   f"{self.width}]")
            pred[:, : predicted.shape[1]] = predicted.detach().to("cpu", torch.int32)
        self._layers.append((experts.detach().to("cpu", torch.int32, copy=True),
                             weights.detach().to("cpu", torch.float32, copy=True), pred))
        if len(self._layers) == self.num_layers:
            # L x [T, K] -> [T, L, K], for experts, weights and predicted (and hidden, L x [T, D])
            parts = [torch.stack(p, dim=1) for p in zip(*self._layers, strict=True)]
            if self.hidden:
                for key, states in self._hidden.items():
                    if len(states) != self.num_layers:
                        raise RuntimeError(f"TraceRecorder: {len(states)} {key} states for {self.num_layers} layers")
                    parts.append(torch.stack(states, dim=1))
            self._chunks.append(tuple(parts))
            self._layers, self._hidden = [], {k: [] for k in HIDDEN}

    def finish(self, after: dict[int, torch.Tensor] | None = None) -> Trace:
        """All recorded tokens as one Trace, [T_total, L, K] in processing order. `after`: predictions made
        by the last forward for a token that never came (layer -> [T, P]), kept as `predicted_after` [L, P]
        (its last token's), since the engine prefetched them."""
        if self._layers:
            raise RuntimeError(f"TraceRecorder.finish: the last forward pass stopped after {len(self._layers)} "
                               f"of {self.num_layers} layers")
        tensors = {}
        if self._chunks:
            import torch

            # forwards x [T_i, L, ...] -> [T_total, L, ...]
            arrays = [torch.cat(parts).numpy() for parts in zip(*self._chunks, strict=True)]
            experts, weights, predicted = arrays[:3]
            if self.hidden:
                tensors |= dict(zip(HIDDEN, arrays[3:], strict=True))
        else:
            empty = (0, self.num_layers, self.top_k)
            experts, weights = np.zeros(empty, np.int32), np.zeros(empty, np.float32)
            predicted = np.zeros((0, self.num_layers, self.width), np.int32)
        # tokens per forward pass, in order: how the engine grouped them (a prompt or a chunk of one, a
        # batched decode step), for `batch_replay.recorded_forwards`
        tensors["forward_tokens"] = np.array([chunk[0].shape[0] for chunk in self._chunks], np.int64)  # [F]
        if after:
            pending = np.full((self.num_layers, self.width), -1, np.int32)  # [L, P]
            for layer, p in after.items():
                pending[layer, : p.shape[1]] = p[-1].cpu().numpy()
            tensors["predicted_after"] = pending
        if self.calibration is not None:
            tensors["calibration"] = self.calibration.astype(np.float32)
        return Trace(experts, weights, predicted, self.num_experts, self.top_k, self.num_layers,
                     self.model_name, dict(self.metadata), tensors)


def routing_counts(experts: np.ndarray, predicted: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """How much locality one sequence's routing has, counted per layer (counts of several sequences
    add up; shares are these over T - 1 pairs or T*K choices). experts, predicted [T, L, K] ->
      same_first [L]     consecutive tokens whose first-choice expert is the same
      same_any   [L]     consecutive tokens whose top-k sets share an expert
      recalled   [L]     choices that the one-layer-ahead prediction named (what a prefetch fetches
                         in time; 0 at layer 0, which has no prediction)
      load, first [L, E] assignments, and first choices, per expert
    """
    T, L, K = experts.shape
    E = num_experts
    layer = np.arange(L)[None, :, None] * E  # [1, L, 1]
    return {
        "same_first": (experts[1:, :, 0] == experts[:-1, :, 0]).sum(0),  # [T-1, L] -> [L]
        "same_any": (experts[1:, :, :, None] == experts[:-1, :, None, :]).any((-1, -2)).sum(0),  # [T-1, L, K, K]
        "recalled": (predicted[..., :, None] == experts[..., None, :]).any(-1).sum((0, 2)),  # [T, L, K, K] -> [L]
        "load": np.bincount((layer + experts).reshape(-1), minlength=L * E).reshape(L, E),  # [T*L*K] -> [L, E]
        "first": np.bincount((layer[..., 0] + experts[..., 0]).reshape(-1), minlength=L * E).reshape(L, E),
    }

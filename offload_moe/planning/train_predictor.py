"""`train-predictor`: fit the learned predictor (predictors.py) on a trace with hidden states, score it
on held-out tokens against the other predictors, and write the file the engine loads.

Samples: for row l, a hidden state of row l - lead of the same token (for l < lead, row
l - lead + L of the token processed before, as the engine predicts across tokens) and the experts
row l chose, as a multi-hot target. The state (`--input`): the row's router input (after its attention,
normed: the default where the trace holds it, since it predicts better), or the one entering the row
(`hidden`, what traces recorded before); the file says which (metadata `input`), and the engine reads that.
Per row, a D -> H -> E MLP (GELU) is fitted with Adam on the binary cross-entropy of each expert being
chosen, its input standardised (mean and spread of the fitted samples, folded into the first layer when
saved). The held-out part is the trace's tail
(`--holdout`, split as `tune` splits: validate.py) or another trace (`--validate`); the file holds
the model fitted on the head only, so the recall printed is the file's own on unseen tokens, and its
calibration (`calibration_of`: per row and rank, the chance the row uses the expert ranked there,
`speculate.calibrate` over every expert ranked) is measured on that held-out part, which lets the engine
weigh each speculative copy's cost (`speculate.decide`). Without a held-out part (`--holdout 0`, or a
trace too short to split) the file has no calibration and the engine prefetches a fixed width. Calibrated,
the file holds one model per lead from 1 to `--lead` (`lead{N}.` keys), each calibrated on the held-out
part: the engine's `--prefetch M` decides copies from lead M and every deeper one (prefetch.py).

Recall of a predictor at width P: the share of the experts row l chose that its P best-ranked
candidates named. Printed per row for
  learned    this file;
  recorded   the predictions the trace recorded (the engine's own predictor when it ran: router,
             one row ahead, unless another was in use);
  frequency  the row's P most used experts in the fitted part (a prior that needs no hidden state);
  previous   the experts the previous token chose at that row (what an LRU cache keeps anyway).

Shape legend: T tokens, L rows, D dim, H hidden size, E experts, K top-k, P width.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..offload.predictors import LearnedPredictor, replayed, save_predictor, source_of
from ..offload.speculate import calibrate
from ..offload.states import HIDDEN
from ..progress import progress_bar
from .trace import Trace, load_trace
from .validate import validation_split


def samples(trace: Trace, row: int, lead: int, state: str = "hidden") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, D] (float32) from the trace's hidden `state` (HIDDEN) and chosen experts [N, K] for one row."""
    hidden = trace.tensors[state]  # [T, L, D] float16
    src, cross = source_of(row, lead, trace.num_layers)
    x = hidden[:-1, src] if cross else hidden[:, src]
    y = trace.experts[1:, row] if cross else trace.experts[:, row]
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def fit_row(x: torch.Tensor, chosen: torch.Tensor, experts: int, hidden: int, steps: int, batch: int,
            lr: float, seed: int) -> dict[str, torch.Tensor]:
    """One row's MLP, with the input standardisation folded into w1, b1."""
    g = torch.Generator().manual_seed(seed)
    mean, spread = x.mean(0), x.std(0) + 1e-4  # [D]
    z = (x - mean) / spread
    target = torch.zeros(len(chosen), experts).scatter_(1, chosen, 1.0)  # [N, E]
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, experts))
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(steps):
        pick = torch.randint(0, len(z), (min(batch, len(z)),), generator=g)
        loss = F.binary_cross_entropy_with_logits(net(z[pick]), target[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    w1, b1 = net[0].weight.detach(), net[0].bias.detach()
    return {"w1": w1 / spread, "b1": b1 - (w1 / spread) @ mean, "w2": net[2].weight.detach().clone(),
            "b2": net[2].bias.detach().clone()}


def recall(ranked: np.ndarray, chosen: np.ndarray) -> float:
    """Share of chosen [N, K] named by ranked [N, P] (-1 names nothing)."""
    if not len(chosen):
        return 0.0
    return float((ranked[:, :, None] == chosen[:, None, :]).any(1).mean())


def calibration_of(model: LearnedPredictor, held: Trace) -> np.ndarray:
    """[L, E]: the predictor's calibration (`speculate.calibrate`) on `held`, routing with hidden states it
    was not fitted on, over its full ranking (every expert), predicted as the engine predicts decoding."""
    full = replayed(held, model, held.num_experts)  # [T, L, E]
    return calibrate(full.predicted, held.experts)


def recall_table(model: LearnedPredictor, fit: Trace, held: Trace, width: int) -> dict[str, list[float]]:
    """Per predictor, recall at `width` of each row on the held-out trace (see the module docstring)."""
    L, E = held.num_layers, held.num_experts
    out: dict[str, list[float]] = {"learned": [], "recorded": [], "frequency": [], "previous": []}
    for row in range(L):
        x, chosen = samples(held, row, model.lead, model.input)
        with torch.no_grad():
            learned = model.rank(row, x, width).numpy()  # [N, P]
        chosen = chosen.numpy()
        out["learned"].append(recall(learned, chosen))
        out["recorded"].append(recall(held.predicted[:, row, :width], held.experts[:, row]))
        counts = np.bincount(fit.experts[:, row].reshape(-1), minlength=E)  # [E]
        frequent = np.argsort(-counts, kind="stable")[:width]
        out["frequency"].append(recall(np.broadcast_to(frequent, (held.num_tokens, width)), held.experts[:, row]))
        out["previous"].append(recall(held.experts[:-1, row], held.experts[1:, row]))
    return out


def run_train_predictor(args) -> int:
    trace = load_trace(args.trace)
    state = args.input if args.input != "auto" else next((k for k in HIDDEN[::-1] if k in trace.tensors), HIDDEN[1])
    if state not in trace.tensors:
        raise UserError(f"trace {args.trace} holds no {state} states: record it with `profile --hidden-states`")
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    if not 1 <= args.lead < L:
        raise UserError(f"--lead must be from 1 to {L - 1} (the trace has {L} layers), not {args.lead}")
    if min(args.hidden_size, args.steps, args.batch) < 1 or not args.lr > 0:
        raise UserError("--hidden-size, --steps, --batch and --lr must be positive")
    if not Path(args.out).parent.is_dir():  # before the fitting, not after it
        raise UserError(f"cannot write {args.out}: folder {Path(args.out).parent} does not exist")
    other = None
    if args.validate:
        other = load_trace(args.validate)
        if state not in other.tensors:
            raise UserError(f"--validate {args.validate} holds no {state} states (record it with --hidden-states)")
    split = validation_split(trace, args.trace, args.holdout, other, args.validate or "")
    if split.held_out is not None and split.held_out.tensors[state].shape[2] != trace.tensors[state].shape[2]:
        raise UserError(f"--validate {args.validate} has hidden states of another size than {args.trace}")
    fit = split.fit
    if fit.num_tokens < 2:
        raise UserError(f"trace {args.trace} has too few tokens to fit on ({fit.num_tokens})")
    # calibrated, every lead up to --lead (the engine decides a deeper lead's copies beside its nearest); else
    # --lead's alone
    leads = list(range(1, args.lead + 1)) if split.held_out is not None else [args.lead]
    pairs = [(lead, row) for lead in leads for row in range(L)]
    weights = [fit_row(*samples(fit, row, lead, state), E, args.hidden_size, args.steps, args.batch, args.lr,
                       args.seed + row)
               for lead, row in progress_bar(pairs, "fitting layers", unit="layer")]
    meta = {"trace": str(args.trace), "model": trace.model, "fitted_tokens": str(fit.num_tokens),
            "hidden_size": str(args.hidden_size), "steps": str(args.steps), "input": state}
    if split.held_out is not None:
        meta["calibrated_tokens"] = str(split.held_out.num_tokens)
    made = [LearnedPredictor(weights[i * L : (i + 1) * L], lead, meta) for i, lead in enumerate(leads)]
    for m in made:
        m.calibration = None if split.held_out is None else calibration_of(m, split.held_out)  # [L, E]
    first, model = made[0], made[-1]  # the file's nearest lead; --lead's, whose recall is printed
    save_predictor(args.out, first.weights, first.lead, meta, first.calibration, made[1:])
    calibrated = first.calibration is not None
    report = {"note": split.note, "input": state, "lead": args.lead, "leads": leads, "out": str(args.out),
              "calibrated": calibrated}
    if split.held_out is not None:
        report["recall"] = {str(w): recall_table(model, fit, split.held_out, w) for w in sorted({K, min(2 * K, E)})}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"wrote {args.out}: per layer a {trace.tensors[state].shape[2]} -> {args.hidden_size} -> {E} MLP on the "
          f"{'router input' if state == 'router_input' else 'hidden state entering the layer'}, "
          f"{', '.join(map(str, leads))} layer(s) ahead (recall below: {args.lead}); "
          f"{split.note}; "
          + ("calibrated on the held-out part: prefetch decided by cost" if calibrated else
             "no calibration (nothing held out): the engine prefetches a fixed width"))
    for width, table in report.get("recall", {}).items():
        print(f"\nheld-out recall at width {width} (share of chosen experts among the {width} predicted)")
        print(f"{'layer':>6}" + "".join(f"{name:>11}" for name in table))
        for row in range(L):
            print(f"{row:>6}" + "".join(f"{100 * table[name][row]:>10.1f}%" for name in table))
        print(f"{'mean':>6}" + "".join(f"{100 * np.mean(table[name]):>10.1f}%" for name in table))
    return 0

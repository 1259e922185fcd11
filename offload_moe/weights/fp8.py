"""Block-FP8 checkpoints: the hub's own files of DeepSeek-V3/R1, MiniMax-M2 and several GLM releases.

Their config.json says `"quantization_config": {"quant_method": "fp8", "weight_block_size": [bn, bk], ...}`
and a quantized weight w [N, K] is stored as `float8_e4m3fn` beside `<name>_scale_inv`, one scale per bn x bk
block, shape [ceil(N/bn), ceil(K/bk)] (the last row and column of blocks may be partial); the real weight
is w * its block's scale. The rest (embeddings, norms, routers, often the LM head) is stored in bf16 or
float32 without a scale, and `modules_to_not_convert` names modules that are read as stored.

Why dequantize at load: the engine computes in its compute dtype (activations are not quantized to FP8, as
`activation_scheme` "dynamic" would on an FP8 kernel) and packs experts in its own formats, so a block-FP8
weight becomes float32 as it is read (`Checkpoint.read`), then takes the path of any float weight: the
compute dtype for dense tensors, `--expert-quant` for experts. `convert` writes the result once; the
packed folder holds no FP8. Converting to a quantized format adds its error to FP8's: `report_error` says
how much, on a sample of experts.

Legend: N output rows, K input columns (as formats/group.py's), bn x bk a block's rows and columns.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.group import GroupQuantFormat

SCALE_SUFFIX = "_scale_inv"  # `<weight name>_scale_inv`: the weight's block scales
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
SAMPLE = 4  # experts `report_error` packs and compares


class BlockFP8:
    """A checkpoint's `quantization_config` fp8: the block [bn, bk] (rows, columns), the modules read as stored,
    and the scale of each weight as the checkpoint names it (found while indexing: `scales`)."""

    def __init__(self, quant: dict, where: Path):
        block = quant.get("weight_block_size", DEFAULT_BLOCK)
        if not (isinstance(block, list | tuple) and len(block) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in block)):
            raise UserError(f"{where}: quantization_config weight_block_size {block!r} is not two positive integers")
        self.block = tuple(block)
        keep = quant.get("modules_to_not_convert") or []
        try:  # transformers' rule: a prefix ending at a module boundary, a regex so, or a suffix
            self.keep = [(re.compile(rf"(?:{p})(?:(?<=\.)|(?=\.|$))"), p) for p in keep]
        except (re.error, TypeError):
            raise UserError(f"{where}: quantization_config modules_to_not_convert {keep!r} is not a list of "
                            "module names") from None
        self.scales: dict[str, tuple[Path, str]] = {}  # weight's stored name -> (file, scale's stored name)

    def converted(self, key: str) -> bool:
        """Whether the weight `key` (a stored name) may be block-FP8: its module is not in modules_to_not_convert."""
        module = key.rsplit(".", 1)[0]
        return not any(pattern.match(module) or module.endswith(p) for pattern, p in self.keep)


def dequantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """w [N, K] (any float dtype, FP8 here) times its blocks' scales [ceil(N/bn), ceil(K/bk)] -> float32 [N, K].
    In place on the float32 copy, the scales widened over rows only ([N, K/bk]), as transformers'
    `_dequantize_fp8_weight`: no second weight-sized tensor."""
    (N, K), (bn, bk) = w.shape, block
    out = w.to(torch.float32, copy=True)  # never the reader's own tensor, even where w is float32
    s = scale.float().repeat_interleave(bn, dim=0)[:N]  # [N, ceil(K/bk)]
    full = K // bk
    out[:, : full * bk].unflatten(-1, (full, bk)).mul_(s[:, :full, None])  # [N, full, bk]
    if full * bk < K:  # the partial last column of blocks
        out[:, full * bk :].mul_(s[:, full:])
    return out


def check_scale(key: str, w: torch.Tensor, scale_key: str, scale: torch.Tensor, block: tuple[int, int],
                where: Path) -> None:
    """A scale that does not cover the weight's blocks exactly is a broken or mismatched file: refused by name."""
    if w.dim() != 2:
        raise UserError(f"{where}: {key} has shape {list(w.shape)}; block-FP8 scales are read for 2-D weights only")
    want = [math.ceil(n / b) for n, b in zip(w.shape, block, strict=True)]
    if list(scale.shape) != want:
        raise UserError(f"{where}: {scale_key} has shape {list(scale.shape)}; {key} {list(w.shape)} in blocks of "
                        f"{list(block)} needs {want}")


def report_error(checkpoint, fmt) -> None:
    """One stderr line: how far `fmt`'s packed experts are from the FP8 weights they were made of, as
    ||packed - fp8|| / ||fp8|| over an expert's w1, w3 (where it has one) and w2, the mean and the largest over up
    to SAMPLE experts spread over the layers. Only quantized formats: a dense one holds the FP8 weights to its
    dtype's rounding."""
    if not isinstance(fmt, GroupQuantFormat):
        return
    c = checkpoint.config
    order = [(layer, e) for layer in c.moe_layers for e in range(c.num_experts)]
    sample = order[:: -(-len(order) // SAMPLE)]
    buf = torch.empty(fmt.nbytes, dtype=torch.uint8)
    errors = []
    for layer, e in sample:
        parts = checkpoint.expert(layer, e)
        fmt.pack(parts, buf)
        pairs = zip(fmt.weights(buf), (torch.cat([parts[p] for p in fmt.up]), parts["w2"]), strict=True)
        diff = sum((q - w.float()).norm().item() ** 2 for q, w in pairs)
        ref = sum(parts[p].float().norm().item() ** 2 for p in c.expert_parts)
        errors.append(math.sqrt(diff / ref) if ref else 0.0)
    print(f"note: {checkpoint.path.name}: FP8 experts as {fmt.name}: relative error {sum(errors) / len(errors):.3%} "
          f"against the FP8 weights (mean of {len(errors)} experts; largest {max(errors):.3%})", file=sys.stderr)

"""`convert`: write a model once in the engine's packed layout (dense weights, experts packed one after another
with a checksummed index), in the expert precision and int4 layout asked for."""

from __future__ import annotations

import argparse

import torch

from ..demo import resolve_model
from ..engine import DTYPES


def cmd_convert(args: argparse.Namespace) -> int:
    from ..formats.int4_layouts import int4_layout_for
    from ..formats.quant import expert_format, load_quant, resolve_group_size
    from ..weights.checkpoint import Checkpoint
    from ..weights.convert import convert

    ckpt = Checkpoint(resolve_model(args.model))
    config = ckpt.config
    quant = load_quant(args.experts, ckpt.mxfp4) if args.experts != "auto" else "mxfp4" if ckpt.mxfp4 else "int4"
    dtype = DTYPES[args.dtype]
    gpu = torch.device("cuda") if torch.cuda.is_available() else None  # quantizes much faster there
    layout = args.layout if args.layout != "auto" else int4_layout_for(gpu or torch.device("cpu"))
    group = resolve_group_size(config, args.group_size, experts=quant in ("int8", "int4"),
                               attention=args.attention == "int8")
    fmt = expert_format(quant, config, dtype, group, layout)
    attention = None if args.attention == "none" else group
    index = convert(resolve_model(args.model), args.out, fmt, dtype, pack_device=gpu, attention_group=attention)
    print(f"wrote {args.out}: {len(index['experts'])} experts as {fmt.name}, {fmt.nbytes / 2**20:.2f} MiB each; "
          f"attention {index['attention']}")
    return 0

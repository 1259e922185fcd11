"""`convert`: write a model once in the engine's packed layout (dense weights, experts packed one after another
with a checksummed index), in the expert precision and int4 layout asked for."""

from __future__ import annotations

import argparse

import torch

from ..demo import find_model
from ..formats.registry import format_for, load_quant, resolve_group_size
from ..plan import DTYPES, kept_gguf
from ..weights.checkpoint import Checkpoint
from ..weights.convert import convert


def cmd_convert(args: argparse.Namespace) -> int:
    source = find_model(args.model, args.revision).path
    ckpt = Checkpoint(source)
    config = ckpt.config
    mxfp4 = ckpt.mxfp4_experts
    quant = load_quant(args.experts, mxfp4) if args.experts != "auto" else "mxfp4" if mxfp4 else "int4"
    int8_attention = args.attention == "int8"
    gpu = torch.device("cuda") if torch.cuda.is_available() else None  # quantizes much faster there
    if args.experts in ("auto", "none") and (kept := kept_gguf(ckpt, "none")) is not None:
        fmt, quant = kept, "gguf"  # a GGUF file's quantized experts keep their types
    else:
        fmt = format_for(config, quant, DTYPES[args.dtype], args.group_size, gpu,
                         layout=None if args.layout == "auto" else args.layout, attention=int8_attention)
    attention = resolve_group_size(config, args.group_size, experts=quant in ("int8", "int4"),
                                   attention=True) if int8_attention else None
    index = convert(source, args.out, fmt, DTYPES[args.dtype], pack_device=gpu,
                    attention_group=attention)
    print(f"wrote {args.out}: {len(index['experts'])} experts as {fmt.name}, {fmt.nbytes / 2**20:.2f} MiB each; "
          f"attention {index['attention']}")
    return 0

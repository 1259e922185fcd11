"""The packed offload folder: a model written once in the engine's own layout, to load fast. This
module reads its index (`read_index`); `convert.py` writes it; `sources.PackedSource` reads its
experts and `checkpoint.Checkpoint` its dense tensors.

    DIR2/config.json         the model shape (Hugging Face style)
    DIR2/dense.safetensors   every non-expert tensor, under our names, RoPE already converted; with
                             int8 attention, each projection as `formats.int8_linear.Int8Linear`'s codes, scales, zeros
    DIR2/experts.bin         each expert's packed buffer (the exact bytes a slot holds), one after
                             another at 4096-byte aligned offsets (so storage can be read with O_DIRECT)
    DIR2/packed.json         version, expert and attention formats, and the index: layer, expert,
                             offset, size, crc32
    DIR2/tokenizer.*, ...    the source's tokenizer, chat template and generation config, when it has them

`convert` is resumable: experts are appended in (layer, expert) order and a journal
(`packed.partial.json`) records, after each flushed batch, how many are safely on disk; a rerun
with the same arguments continues from there. The index is written last, atomically, so a folder
with `packed.json` is complete. Checksums are checked when the experts are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

VERSION = 1
ALIGN = 4096
INDEX, JOURNAL, DATA, DENSE = "packed.json", "packed.partial.json", "experts.bin", "dense.safetensors"


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / INDEX} cannot be read: {e}") from None
    if index.get("version") != VERSION:
        raise UserError(f"{folder} was written by an incompatible offload_moe (packed format version "
                        f"{index.get('version')}, this one reads {VERSION}): convert the model again")
    return index


def packed_attention_group(index: dict) -> int | None:
    """The group size of a packed folder's int8 attention, or None when it holds dense attention."""
    name = index.get("attention", "none")
    if name == "none":
        return None
    group = name.removeprefix("int8-g")
    if not group.isdigit():
        raise UserError(f"packed.json: unknown attention format {name!r}; convert the model again")
    return int(group)

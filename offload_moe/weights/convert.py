"""Writing a packed offload folder (see `packed.py` for its layout).

`convert` is resumable: experts are appended in (layer, expert) order and a journal
(`packed.partial.json`) records, after each flushed batch, how many are safely on disk; a rerun
with the same arguments continues from there. The index is written last, atomically, so a folder
with `packed.json` is complete. Checksums are checked when the experts are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import read_json
from ..errors import UserError
from ..formats.base import ExpertFormat
from ..formats.ggml import GGUFFormat
from ..formats.int8_linear import ATTENTION_SUFFIXES, check_int8_attention, int8_attention_state
from ..gguf_tokenizer import gguf_tokenizer
from ..modeling.transformer import ROUTER_BIAS
from ..offload.predictors import FILE_NAME as PREDICTOR_FILE
from ..progress import progress_bar
from ..tokenizer import tokenizer_files
from .checkpoint import Checkpoint, check_finite
from .packed import ALIGN, DATA, DENSE, INDEX, JOURNAL, VERSION, aligned
from .sources import MappedSource

FLUSH_EVERY = 16  # experts between journal updates


def convert(source: str | Path, out: str | Path, fmt: ExpertFormat, dense_dtype: torch.dtype,
            progress: bool = True, pack_device: torch.device | None = None, attention_group: int | None = None) -> dict:
    """Write `source` (any layout the engine reads) as a packed folder; resume an interrupted run.
    With `attention_group`, the attention projections are stored as int8 (`formats.int8_linear.Int8Linear`'s parts)."""
    ckpt = Checkpoint(source)
    out = Path(out)
    if ckpt.layout == "packed":
        raise UserError(f"{source} is already a packed folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if (out / INDEX).exists():
        raise UserError(f"{out} already holds a packed model; remove it or choose another --out")
    if attention_group is not None:
        check_int8_attention(ckpt.config, attention_group)
    # a GGUF's tokenizer, built before the experts are written (bad metadata stops the run now), saved as a folder's
    tokenizer = gguf_tokenizer(ckpt.gguf) if ckpt.gguf is not None else None
    settings = {"version": VERSION, "format": fmt.name, "bytes_per_expert": fmt.nbytes,
                "attention": "none" if attention_group is None else f"int8-g{attention_group}",
                "dense_dtype": str(dense_dtype).removeprefix("torch."), "source": str(Path(source).resolve())}
    if isinstance(fmt, GGUFFormat):  # each row's part types: the layout of its experts
        settings["gguf_types"] = [[k.name for k in row] for row in fmt.kinds]
    c = ckpt.config
    order = [(layer, e) for layer in c.moe_layers for e in range(c.num_experts)]
    stride = aligned(fmt.nbytes)
    entries, start = _begin(out, settings, stride)

    buf = torch.empty(stride, dtype=torch.uint8)
    experts, row_of = MappedSource(ckpt, fmt, drop_pages=False, pack_device=pack_device), c.row_of
    with open(out / DATA, "r+b") as f, progress_bar(what="converting experts", total=len(order) * fmt.nbytes,
                                                     initial=start * fmt.nbytes, unit="B", enabled=progress) as bar:
        f.truncate(start * stride)  # drop anything written after the last journal entry
        f.seek(start * stride)
        for i, (layer, e) in enumerate(order[start:], start):
            buf.zero_()
            experts.read((row_of[layer], e), buf[: fmt.nbytes])
            views = fmt.views(buf[: fmt.nbytes], row_of[layer])
            check_finite(fmt.weights(views, torch.float32) if isinstance(fmt, GGUFFormat) else views,
                         f"{source}: expert ({layer}, {e})")
            data = buf.numpy().tobytes()
            f.write(data)
            entries.append([layer, e, i * stride, fmt.nbytes, zlib.crc32(data[: fmt.nbytes])])
            bar.update(fmt.nbytes)
            if (i + 1) % FLUSH_EVERY == 0:
                _journal(out, f, settings, entries)
        _journal(out, f, settings, entries)

    dense = {}
    for name in ckpt.expected_dense():
        t = ckpt.dense(name)
        check_finite((t,), f"{source}: tensor {name}")
        if attention_group is not None and name.endswith(ATTENTION_SUFFIXES):
            dense |= int8_attention_state(name, t, attention_group)
        else:  # the sigmoid router's choice bias stays float32, as the engine holds it
            dense[name] = (t.float() if name.endswith(ROUTER_BIAS) else t.to(dense_dtype)).contiguous()
    save_file(dense, out / DENSE, metadata={"format": "pt"})
    # the source's own config.json where it has one (it names the family), a GGUF's metadata as one, else Mixtral's
    # from params.json
    if ckpt.layout == "hf":
        hf = read_json(ckpt.path / "config.json")
        if ckpt.fp8 is not None:  # the packed weights are dequantized (and quantized as `fmt` says): no FP8 left
            del hf["quantization_config"]
    else:
        hf = ckpt.gguf.hub_config()[1] if ckpt.layout == "gguf" else c.to_hf_config()
    hf["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    for file in tokenizer_files(ckpt.path):  # tokenizer, chat template, generation config: the stop ids
        shutil.copy(file, out / file.name)
    if tokenizer is not None:
        tokenizer.save(out)
    if (ckpt.path / PREDICTOR_FILE).is_file():  # the learned predictor --predictor auto loads: the model's hidden
        shutil.copy(ckpt.path / PREDICTOR_FILE, out / PREDICTOR_FILE)  # states, whatever the experts' format
    index = {**settings, "align": ALIGN, "experts": entries}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX)
    (out / JOURNAL).unlink(missing_ok=True)
    return index


def _journal(out: Path, f, settings: dict, entries: list) -> None:
    f.flush()
    os.fsync(f.fileno())
    _write_journal(out, settings, entries)


def _write_journal(out: Path, settings: dict, entries: list) -> None:
    tmp = out / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps({**settings, "experts": entries}))
    os.replace(tmp, out / JOURNAL)


def _begin(out: Path, settings: dict, stride: int) -> tuple[list, int]:
    """Where this run starts: an interrupted run's entries (`_resume`), or a new folder with an empty journal."""
    entries, start = _resume(out, settings, stride)
    if entries is not None:
        return entries, start
    # a folder holding only what a run killed before its first journal left (experts.bin, a journal's temporary
    # file) starts again; anything else is someone's
    ours = {DATA, JOURNAL + ".tmp"}
    if out.exists() and any(p.name not in ours for p in out.iterdir()):
        raise UserError(f"{out} exists and is not empty (nor an interrupted conversion of the same model)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DATA).write_bytes(b"")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    _write_journal(out, settings, [])  # at once: a run killed now resumes, it does not block the folder
    return [], 0


def _resume(out: Path, settings: dict, stride: int) -> tuple[list | None, int]:
    """Entries already on disk from an interrupted run with the same settings, or (None, 0)."""
    try:
        journal = json.loads((out / JOURNAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None, 0
    if any(journal.get(k) != v for k, v in settings.items()) or not (out / DATA).exists():
        raise UserError(f"{out} holds an interrupted conversion with other settings; remove it or choose another "
                        "--out")
    entries = journal["experts"]
    if (out / DATA).stat().st_size < len(entries) * stride:
        return [], 0
    return entries, len(entries)

"""GGUF files (llama.cpp's format), read with llama.cpp's own reader (`gguf.GGUFReader`).

A file, or the split set (`NAME-00001-of-0000N.gguf`) whose first file stands for it, is memory-mapped once:
the metadata becomes the config.json that the family's reader takes (`hub_config`), and each tensor is read
when asked for, dequantized exactly by gguf-py's own decoder (`gguf.quants.dequantize`) into float32, or kept
as F16 / BF16 where the file holds those. A layer's experts are one stacked tensor per part (`ffn_*_exps`,
[E, ...]): an expert's slice is taken from the mapping before decoding, so reading one expert reads its bytes
only. The names become ours in `weights/checkpoint.py`, through the family's GGUF tables (`models/`).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, Keys
from gguf.quants import dequantize

from ..errors import UserError
from ..models import GGUF_CONFIG, config_of, gguf_family

# the tensor types read: floats as they are (F32, F16, BF16), the others decoded exactly by gguf-py; any other
# (IQ*, TQ* ...) is refused by name
FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
DECODED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4)
READ = (*FLOATS, *DECODED)

SPLIT = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")


def split_set(path: Path) -> list[Path]:
    """The files of a model: the file itself, or every file of the split set whose first file it is."""
    m = SPLIT.fullmatch(path.name)
    if m is None:
        return [path]
    n = int(m[3])
    if int(m[2]) != 1:
        raise UserError(f"{path} is part {int(m[2])} of {n}: give the first file, {m[1]}-00001-of-{m[3]}.gguf")
    files = [path.with_name(f"{m[1]}-{i:05d}-of-{m[3]}.gguf") for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: the split set lacks {', '.join(missing)}")
    return files


class GGUFTensor:
    """One tensor in the mapping, not yet read: shape as torch's (outermost first), type, and its decoding."""

    def __init__(self, name: str, kind: Q, shape: tuple[int, ...], data: np.ndarray):
        self.name, self.kind, self.shape, self.data = name, kind, shape, data

    def __getitem__(self, i: int) -> torch.Tensor:
        """Slice i of the outermost dimension (an expert of a stacked tensor), decoded alone."""
        return _decode(self.data[i], self.kind)

    def dequantize(self) -> torch.Tensor:
        return _decode(self.data, self.kind)


def _decode(data: np.ndarray, kind: Q) -> torch.Tensor:
    """Raw data from the mapping as a torch tensor of its own (the mapping is read-only)."""
    if kind == Q.BF16:  # gguf-py holds BF16 as bytes: the same bits, viewed
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16)
    if kind in FLOATS:
        return torch.from_numpy(np.array(data))
    return torch.from_numpy(dequantize(data, kind))


class GGUFModel:
    """A GGUF model (one file or a split set), memory-mapped once: its metadata and tensors by llama.cpp's names."""

    def __init__(self, path: Path):
        self.path = path
        self.files = split_set(path)
        self.fields: dict = {}
        self.tensors: dict[str, tuple[Path, object]] = {}  # name -> (file, gguf's ReaderTensor)
        for file in self.files:
            try:
                reader = GGUFReader(file)
            except Exception as e:  # gguf-py raises ValueError and numpy's errors for damaged files
                raise UserError(f"cannot read {file.name}: {str(e).strip()[:160]} (not a GGUF file, or truncated?)"
                                ) from None
            if not self.fields:  # the first file holds the metadata; the others, the split keys
                self.fields = reader.fields
            for t in reader.tensors:
                self.tensors[t.name] = (file, t)
        self.arch = str(self.value(Keys.General.ARCHITECTURE) or "")

    def value(self, key: str):
        """A metadata value (a number, a string or a list), None when the file lacks it. A float32 is the decimal
        the converter was given (1e-05, not 9.99999975e-06): the shortest one that rounds to it."""
        field = self.fields.get(key)
        if field is None:
            return None
        if field.types == [GGUFValueType.FLOAT32]:
            return float(str(np.float32(field.contents())))
        return field.contents()

    def meta(self, key: str):
        """The arch's own metadata value `{arch}.key`, None when the file lacks it."""
        return self.value(f"{self.arch}.{key}")

    def need(self, key: str):
        """`meta(key)`, which this arch's files always have: its absence is a one-line error."""
        value = self.meta(key)
        if value is None:
            raise UserError(f"{self.path}: metadata {self.arch}.{key} is missing")
        return value

    def tensor(self, name: str) -> GGUFTensor:
        _, t = self.tensors[name]
        return GGUFTensor(name, t.tensor_type, tuple(int(n) for n in reversed(t.shape.tolist())), t.data)

    def raw(self, name: str, index: int | None = None) -> tuple[Q, torch.Tensor]:
        """A tensor's type and bytes as the file holds them, [..., rows, row bytes] uint8 (slice `index` of the
        outermost dimension alone: an expert of a stacked tensor), copied out of the mapping."""
        _, t = self.tensors[name]
        data = t.data if index is None else t.data[index]
        return t.tensor_type, torch.from_numpy(np.array(data).view(np.uint8))

    def file_of(self, name: str) -> Path:
        return self.tensors[name][0]

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a tensor is read in: its own for F32, F16 and BF16, float32 for a decoded one."""
        return FLOATS.get(self.tensors[name][1].tensor_type, torch.float32)

    def type_name(self, name: str) -> str:
        return self.tensors[name][1].tensor_type.name

    def hub_config(self) -> tuple[ModuleType, dict]:
        """The family, and the metadata as the config.json its reader takes (`models.GGUF_CONFIG`, then the family's
        `gguf_config`); the rest from the tensors: the vocabulary from token_embd, a tied head where there is no
        output, attention biases. Layers past `nextn_predict_layers` from the end are multi-token prediction's,
        not run; YaRN is read as the hub writes it (`rope_scaling`)."""
        family, model_type = gguf_family(self.arch, self.path)
        if "token_embd.weight" not in self.tensors:
            raise UserError(f"{self.path}: tensor token_embd.weight is missing")
        c = {"model_type": model_type, "architectures": list(family.MODEL_TYPES[model_type]),
             "rope_theta": 10000.0}  # llama.cpp's default where the file has no rope.freq_base
        for key, hub in GGUF_CONFIG.items():
            value = self.value(f"{self.arch}.{key}")
            if value is not None:
                c[hub] = value
        scaling = self.meta("rope.scaling.type")
        if scaling == "yarn":
            c["rope_scaling"] = {"rope_type": "yarn", "factor": self.need("rope.scaling.factor"),
                                 "original_max_position_embeddings": self.need("rope.scaling.original_context_length")}
            for key, hub in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                             ("yarn_attn_factor", "attention_factor")):
                if self.meta(f"rope.scaling.{key}") is not None:
                    c["rope_scaling"][hub] = self.meta(f"rope.scaling.{key}")
        elif scaling not in (None, "none"):
            raise UserError(f"{self.path}: RoPE scaling {scaling!r} is not read from a GGUF yet")
        c["vocab_size"] = self.tensor("token_embd.weight").shape[0]
        c["tie_word_embeddings"] = "output.weight" not in self.tensors
        c["qkv_bias"] = c["attention_bias"] = any(name.endswith(".attn_q.bias") for name in self.tensors)
        for key, hub in ((Keys.Tokenizer.BOS_ID, "bos_token_id"), (Keys.Tokenizer.EOS_ID, "eos_token_id")):
            if self.value(key) is not None:
                c[hub] = self.value(key)
        try:
            if nextn := self.meta("nextn_predict_layers"):
                c |= {"num_hidden_layers": c.get("num_hidden_layers", 0) - nextn, "num_nextn_predict_layers": nextn}
            if hasattr(family, "gguf_config"):
                family.gguf_config(c, self)
        except (TypeError, ValueError, ArithmeticError, KeyError, IndexError) as e:  # a value of the wrong kind
            raise UserError(f"{self.path}: a metadata value has the wrong type or range "
                            f"({type(e).__name__}: {e})") from None
        return family, c

    def config(self):
        family, c = self.hub_config()
        return config_of(c, self.path, family)[1]

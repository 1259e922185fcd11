"""Checkpoint reading: where checkpoint names become ours, through each family's tables (`models/`).

Our names are listed in `models/__init__.py`; experts are addressed as `(layer, expert)` with
parts `w1`, `w3` [I, D] and `w2` [D, I] (the down projection).

Layouts read, tensor by tensor (safetensors and mmap'd torch files), never the whole model at once:
  hf        config.json + model.safetensors, or shards listed in model.safetensors.index.json, with
            the names of the family that config.json names (e.g. Mixtral's
            `block_sparse_moe.experts.E.w1.weight` or transformers-5's fused `mlp.experts.gate_up_proj`,
            Qwen's `mlp.experts.E.gate_proj.weight`); a family may rename a wrapper's prefix first (`PREFIXES`,
            Qwen3.5's `model.language_model.`), skip known tensors it does not run without reading them
            (`SKIPPED`, a vision tower: said once on stderr), and make one of ours of several (`JOINED`)
  packed    written by `convert` (see packed.py): dense.safetensors already under our names, and the
            experts as ready-packed buffers in experts.bin
  original  Mixtral's release: params.json + consolidated.NN.pt, experts stacked per layer as
            `block_sparse_moe.w1/w2/w3` [E*I, D] (w2's block is the transpose of the down projection)
            or named `feed_forward.experts.E.w1.weight`. Its wq/wk use interleaved (complex-pair) RoPE;
            we permute them once here to the rotate-halves convention that the model uses.
  gguf      llama.cpp's file (`NAME.gguf`, or the first file of a split set), through `gguf.py`: the config from
            its metadata, the family's GGUF names (`blk.N.attn_q.weight`), each expert a slice of its layer's
            stacked `ffn_{gate,up,down}_exps` (or fused `ffn_gate_up_exps`; or, in Mixtral files before April
            2024, `ffn_gate.E`), decoded exactly to float; the `llama` arch's wq/wk are interleaved as the
            original layout's, and permuted back the same way; what else the converter changed, the family's GGUF
            tables undo (a tensor it split is joined again, a value it stored transformed is transformed back).

Block-FP8 weights (an hf layout whose config.json has `quantization_config` fp8: DeepSeek-V3/R1's, MiniMax-M2's
and GLM's own files) are read through `fp8.py`: each weight with a `<name>_scale_inv` comes out dequantized
to float32, so every reader and expert format takes them as any float weight.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from gguf import GGMLQuantizationType as GGML_TYPES
from safetensors import safe_open

from ..config import ModelConfig, from_params_json, read_json
from ..errors import UserError
from ..formats.base import bias_parts
from ..formats.ggml import FLOATS as GGML_FLOATS
from ..formats.ggml import row_bytes
from ..formats.int8 import int8_part_shapes
from ..formats.int8_linear import ATTENTION_SUFFIXES
from ..models import COMMON, GGUF_COMMON, GGUF_EXPERTS, GGUF_PARTS, config_of, mixtral
from .fp8 import FLOAT8, SCALE_SUFFIX, BlockFP8, check_scale, dequantize
from .gguf import READ, GGUFModel, GGUFTensor
from .packed import DENSE, packed_attention_group, read_index

# A source: (file, key in that file, transform applied after reading)
Source = tuple[Path, str, Callable[[torch.Tensor], torch.Tensor] | None]


class Joined(NamedTuple):
    """One of our tensors made of several checkpoint tensors (a family's `JOINED`): their sources, and the
    function of the config and the parts (read in that order) that gives ours."""
    sources: tuple[Source, ...]
    join: Callable[..., torch.Tensor]


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute wq/wk rows from the interleaved RoPE convention to rotate-halves (as HF's conversion)."""
    rows, cols = w.shape
    # [H*hd, D] -> [H, hd/2, 2, D] -> [H, 2, hd/2, D] -> [H*hd, D]
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

# a safetensors header's dtype names (others are reported by name, and refused)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def check_finite(tensors, what: str) -> None:
    """A NaN or an infinity in a weight is a broken file: refused, not loaded nor written into a packed folder.
    `tensors`: tensors, or an expert format's views (nested tuples with other values beside them)."""
    for t in tensors:
        if isinstance(t, tuple | list):
            check_finite(t, what)
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{what} holds NaN or infinite values")


class Checkpoint:
    """A model folder, opened lazily. `dense()` yields resident tensors, `expert()` one expert's parts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        gguf = self.path.suffix == ".gguf"
        if not (self.path.is_file() if gguf else self.path.is_dir()):
            raise UserError(f"no such {'GGUF file' if gguf else 'model folder'}: {self.path}")
        self._files: dict[Path, object] = {}
        self.dense_sources: dict[str, Source | Joined] = {}
        self.expert_sources: dict[tuple[int, int, str], Source] = {}
        self.packed_index: dict | None = None
        self.not_run: dict[str, int] = {}  # the family's SKIPPED tensors found, by what they are: said at first read
        self.gguf: GGUFModel | None = None
        self.fp8: BlockFP8 | None = None  # an hf layout's block-FP8 weights: dequantized as they are read
        if gguf:
            self.layout = "gguf"
            self.gguf = GGUFModel(self.path)
            family, hub = self.gguf.hub_config()
            self.family, self.config = config_of(hub, self.path, family)
            self._index_gguf()
        elif (self.path / "packed.json").exists():
            self.layout = "packed"
            raw = read_json(self.path / "config.json")
            self.family, self.config = config_of(raw, self.path / "config.json")
            self.packed_index = read_index(self.path)
            dense = self.path / DENSE
            if not dense.exists():
                raise UserError(f"{self.path}: {DENSE} is missing")
            self.dense_sources = {key: (dense, key, None) for key in self._keys(dense)}
        elif (self.path / "config.json").exists():
            self.layout = "hf"
            raw = read_json(self.path / "config.json")
            self.family, self.config = config_of(raw, self.path / "config.json")
            quant = raw.get("quantization_config") or {}
            if quant.get("quant_method") == "fp8":
                self.fp8 = BlockFP8(quant, self.path / "config.json")
            self._index_hf()
            self._join(getattr(self.family, "JOINED", ()))
            self._check_beyond(int(raw.get("num_nextn_predict_layers") or 0))
        elif (self.path / "params.json").exists():
            self.layout = "original"
            self.family = mixtral
            self.config = from_params_json(self.path / "params.json")
            self._index_original()
        else:
            raise UserError(f"{self.path}: no config.json (Hugging Face layout) or params.json (original layout)")
        self._check_complete()
        self.dtype = self.dtype_of(*self.dense_sources["tok_embeddings.weight"][:2])  # from the header: no data read
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UserError(f"{self.path}: weights are {self.dtype}; expected float32, float16 or bfloat16")

    # -- indexing (reads each file's key list once) --------------------------------------
    def _index_hf(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} is not a valid safetensors index (needs a 'weight_map')") from None
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} is not a valid safetensors index (its 'weight_map' is not an object)")
            by_file: dict[str, list[str]] = {}
            for key, fname in weight_map.items():  # inside by name: a hub cache's files are links to its blobs/
                if not isinstance(fname, str) or Path(os.path.normpath(fname)).parts[:1] in (("/",), ("..",)):
                    raise UserError(f"{index}: shard {fname!r} of {key} is not a file inside the model folder")
                by_file.setdefault(fname, []).append(key)
        else:
            single = self.path / "model.safetensors"
            if not single.exists():
                raise UserError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
            by_file = {single.name: self._open(single).keys()}
        E, I = self.config.num_experts, self.config.ffn_dim
        f = self.family
        expert, fused, dense = f.EXPERT and re.compile(f.EXPERT), f.FUSED and re.compile(f.FUSED), f.DENSE + COMMON
        split = getattr(f, "FUSED_PARTS", None)  # the family's own fused layout (gpt-oss), else transformers 5's
        prefixes = getattr(f, "PREFIXES", {})  # a wrapper's prefix -> the names the tables read (Qwen3.5's VL model)
        skipped = {what: re.compile(pattern) for pattern, what in getattr(f, "SKIPPED", {}).items()}
        for fname, keys in by_file.items():
            file = self.path / fname
            if not file.exists():
                raise UserError(f"{self.path}: shard {fname} is listed in the index but missing")
            for stored in keys:
                if self.fp8 is not None and stored.endswith(SCALE_SUFFIX):  # a weight's scales, read with it
                    self.fp8.scales[stored.removesuffix(SCALE_SUFFIX)] = (file, stored)
                    continue
                key = next((ours + stored[len(p):] for p, ours in prefixes.items() if stored.startswith(p)), stored)
                if what := next((w for w, pattern in skipped.items() if pattern.fullmatch(key)), None):
                    self.not_run[what] = self.not_run.get(what, 0) + 1  # known, not run, never opened
                elif expert and (m := expert.fullmatch(key)):
                    self.expert_sources[(int(m[1]), int(m[2]), f.PARTS[m[3]])] = (file, stored, None)
                elif split and (m := fused.fullmatch(key)):
                    for e in range(E):
                        for part, (index, transposed) in split[m[2]].items():
                            self.expert_sources[(int(m[1]), e, part)] = (file, stored, _pick(e, index, transposed))
                elif fused and (m := fused.fullmatch(key)):
                    layer = int(m[1])
                    for e in range(E):
                        if m[2] == "down_proj":
                            self.expert_sources[(layer, e, "w2")] = (file, stored, _pick(e))
                        else:  # gate_up_proj [E, 2I, D]: w1 rows first, then w3
                            self.expert_sources[(layer, e, "w1")] = (file, stored, _pick(e, (slice(0, I),)))
                            self.expert_sources[(layer, e, "w3")] = (file, stored, _pick(e, (slice(I, 2 * I),)))
                else:
                    self._add_dense(key, dense, file, None, stored)

    def _join(self, table) -> None:
        """The family's `JOINED` (or `GGUF_JOINED`) [(our name, its parts' names, join)], each name with `{0}` for
        the layer: where a layer has every part (as the family's tables name them), ours reads them all and joins
        them."""
        for target, parts, join in table:
            for i in range(self.config.n_layers):
                names = [part.format(i) for part in parts]
                if all(name in self.dense_sources for name in names):
                    self.dense_sources[target.format(i)] = Joined(tuple(self.dense_sources.pop(n) for n in names),
                                                                  join)

    def _index_original(self) -> None:
        files = sorted(self.path.glob("consolidated.*.pt")) + sorted(self.path.glob("consolidated.*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: params.json found but no consolidated.NN.pt files")
        c = self.config
        E, I = c.num_experts, c.ffn_dim
        for file in files:
            for key in self._keys(file):
                if m := re.fullmatch(mixtral.ORIGINAL_STACKED, key):
                    layer, part = int(m[1]), m[2]
                    for e in range(E):
                        rows = _rows(e * I, (e + 1) * I)
                        # w2 is stored [E*I, D]: each expert's block is the transpose of its [D, I] weight
                        fn = _compose(rows, torch.t) if part == "w2" else rows
                        self.expert_sources[(layer, e, part)] = (file, key, fn)
                elif m := re.fullmatch(mixtral.ORIGINAL_EXPERT, key):
                    self.expert_sources[(int(m[1]), int(m[2]), m[3])] = (file, key, None)
                else:
                    fix = None
                    if key.endswith("attention.wq.weight"):
                        fix = _permute(c.n_heads)
                    elif key.endswith("attention.wk.weight"):
                        fix = _permute(c.n_kv_heads)
                    self._add_dense(key, mixtral.ORIGINAL_DENSE, file, fix)

    def _index_gguf(self) -> None:
        """Every tensor the config needs, by our name; a type gguf.py does not read is refused here, by name. The
        layers past the config's (multi-token prediction's, `nextn_predict_layers`) are not read."""
        c, f, g = self.config, self.family, self.gguf
        stacked, alone = re.compile(GGUF_EXPERTS), f.GGUF_EXPERT and re.compile(f.GGUF_EXPERT)
        parts, I = getattr(f, "GGUF_PARTS", GGUF_PARTS), c.ffn_dim
        for key in g.tensors:
            if (m := re.match(r"blk\.(\d+)\.", key)) and int(m[1]) >= c.n_layers:
                continue
            if m := stacked.fullmatch(key):
                for e in range(c.num_experts):
                    at = (int(m[1]), e)
                    if m[2] == "gate_up":  # [E, 2I, D]: w1 rows first, then w3
                        self.expert_sources[(*at, "w1")] = (g.file_of(key), key, _pick(e, (slice(0, I),)))
                        self.expert_sources[(*at, "w3")] = (g.file_of(key), key, _pick(e, (slice(I, 2 * I),)))
                    else:  # a bias is b1, b3 or b2 beside w1, w3 or w2
                        part = parts[m[2]] if m[3] == "weight" else "b" + parts[m[2]][1:]
                        self.expert_sources[(*at, part)] = (g.file_of(key), key, _pick(e))
            elif alone and (m := alone.fullmatch(key)):
                self.expert_sources[(int(m[1]), int(m[3]), parts[m[2]])] = (g.file_of(key), key,
                                                                           GGUFTensor.dequantize)
            else:
                self._add_dense(key, f.GGUF_DENSE + GGUF_COMMON, g.file_of(key), GGUFTensor.dequantize)
        self._join(getattr(f, "GGUF_JOINED", ()))
        if f.GGUF_PERMUTED:  # llama.cpp's converter interleaved wq/wk rows (LlamaModel.permute)
            for i in range(c.n_layers):
                for name, heads in (("wq", c.n_heads), ("wk", c.n_kv_heads)):
                    ours = f"layers.{i}.attention.{name}.weight"
                    if ours in self.dense_sources:
                        file, key, _ = self.dense_sources[ours]
                        self.dense_sources[ours] = (file, key, _compose(GGUFTensor.dequantize, _permute(heads)))
        expected = self.expected_dense()
        used = [s[1] for name, source in self.dense_sources.items() if name in expected
                for s in (source.sources if isinstance(source, Joined) else (source,))]
        used += sorted({key for _, key, _ in self.expert_sources.values()})
        unread = [key for key in used if g.tensors[key][1].tensor_type not in READ]
        if unread:
            kinds = sorted({g.type_name(key) for key in unread})
            raise UserError(f"{self.path}: tensor type {', '.join(kinds)} is not read ({unread[0]}"
                            f"{f' and {len(unread) - 1} more' if len(unread) > 1 else ''}; read: "
                            f"{', '.join(t.name for t in READ)})")

    def _add_dense(self, key: str, table, file: Path, fix, stored: str | None = None) -> None:
        """`key` as the table reads it; `stored`, as the file names it where a prefix was renamed. A table's name is
        a format string of the match's groups, or a function of the config and them (a name that depends on the
        layer's kind: Nemotron-H's one norm a layer); a GGUF table's entry may add what undoes the converter's
        change to the tensor, a function of the config and it, applied after `fix`."""
        for pattern, ours, *undo in table:
            if m := re.fullmatch(pattern, key):
                name = ours(self.config, *m.groups()) if callable(ours) else ours.format(*m.groups())
                self.dense_sources[name] = (file, stored or key, _undo(fix, *undo, self.config) if undo else fix)
                return
        # unknown tensors (rotary caches, extra heads) are ignored on purpose

    def expected_dense(self) -> dict[str, tuple[int, ...]]:
        """Every resident tensor the config implies, by our name, with its shape."""
        c = self.config
        D, hd = c.dim, c.head_dim
        q, kv = c.n_heads * hd, c.n_kv_heads * hd
        norms = ("weight", "bias") if c.norm == "layer" else ("weight",)
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (c.vocab_size, D)}
        shapes |= {f"norm.{n}": (D,) for n in norms}
        if not c.tie_word_embeddings:
            shapes["output.weight"] = (c.vocab_size, D)
        if c.lm_head_bias:
            shapes["output.bias"] = (c.vocab_size,)
        qk_norm = {"none": {}, "head": {"q_norm": hd, "k_norm": hd}, "full": {"q_norm": q, "k_norm": kv}}[c.qk_norm]
        for i in range(c.n_layers):
            p = f"layers.{i}."
            a = p + "attention."
            if i not in c.ffn_only:  # a layer of one piece (Nemotron-H) has one norm
                shapes |= {p + f"attention_norm.{n}": (D,) for n in norms}
            if i not in c.mixer_only:
                shapes |= {p + f"ffn_norm.{n}": (D,) for n in norms}
            if i in c.linear_layers:
                shapes |= {a + name: shape for name, shape in linear_attention_shapes(c).items()}
            elif i in c.conv_layers:
                shapes |= {a + name: shape for name, shape in short_conv_shapes(c).items()}
            elif i in c.mamba_layers:
                shapes |= {a + name: shape for name, shape in mamba_shapes(c).items()}
            elif c.has_attention(i):  # not an FFN alone
                if c.kv_lora_rank:
                    shapes |= {a + name: shape for name, shape in latent_attention_shapes(c).items()}
                else:
                    shapes |= {a + "wq.weight": (q * (1 + c.attention_output_gate), D), a + "wk.weight": (kv, D),
                               a + "wv.weight": (kv, D), a + "wo.weight": (D, q)}
                if c.qkv_bias:
                    shapes |= {a + "wq.bias": (q * (1 + c.attention_output_gate),), a + "wk.bias": (kv,),
                               a + "wv.bias": (kv,)}
                if c.o_bias:
                    shapes[a + "wo.bias"] = (D,)
                if c.attention_sinks:
                    shapes[a + "sinks"] = (c.n_heads,)
                shapes |= {a + f"{name}.weight": (n,) for name, n in qk_norm.items()}
            if i in c.mixer_only:
                continue
            if i in c.dense_layers:
                shapes |= mlp_shapes(c, p + "mlp.", c.dense_ffn_dim)
                continue
            shapes[p + "gate.weight"] = (c.num_experts, D)
            if c.router_bias:
                shapes[p + "gate.bias"] = (c.num_experts,)
            if c.router == "sigmoid":
                shapes[p + "gate.e_score_correction_bias"] = (c.num_experts,)
            if c.shared_ffn_dim:
                shapes |= mlp_shapes(c, p + "shared.", c.shared_ffn_dim)
            if c.shared_gate:
                shapes[p + "shared_gate.weight"] = (1, D)
        if self.packed_index is not None:  # a packed folder with int8 attention holds Int8Linear's parts instead
            group = packed_attention_group(self.packed_index)
            for name in [n for n in shapes if group is not None and n.endswith(ATTENTION_SUFFIXES)]:
                prefix = name.removesuffix("weight")
                shapes |= {prefix + part: shape for part, shape in int8_part_shapes(*shapes.pop(name), group).items()}
        return shapes

    @property
    def mxfp4(self) -> bool:
        """The experts are stored as MXFP4 blocks and scales (gpt-oss's official checkpoints)."""
        return any(part == "w1_blocks" for _, _, part in self.expert_sources)

    @property
    def mxfp4_experts(self) -> bool:
        """The experts are MXFP4 in the file: the official checkpoints' blocks and scales (`mxfp4`), or a GGUF's
        MXFP4 tensors. These are read decoded, and `formats.mxfp4.quantize` encodes their values again exactly:
        every MXFP4 value of a block is one of the grid's at the scale it picks, the smallest power of two that
        holds the block's largest value, never above the block's own."""
        if self.gguf is None:
            return self.mxfp4
        return any(self.gguf.tensors[key][1].tensor_type == GGML_TYPES.MXFP4
                   for (_, _, part), (_, key, _) in self.expert_sources.items() if part in ("w1", "w3", "w2"))

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """The parts of an expert as the checkpoint stores them: w1, w3 [I, D] and w2 [D, I], or their MXFP4
        blocks and scales (`mxfp4.py`); and the biases where the family has them."""
        c = self.config
        shapes = c.ffn_shapes()
        if self.mxfp4:
            shapes = {f"{w}_{what}": (n, k // 32, 16)[: 3 if what == "blocks" else 2]
                      for w, (n, k) in shapes.items() for what in ("blocks", "scales")}
        return shapes | {name: (n,) for name, n in bias_parts(c).items()}

    def _check_beyond(self, mtp: int) -> None:
        """Layers or experts the checkpoint has beyond what its config declares mean a config that does not fit
        it (`num_hidden_layers: 2` on a 4-layer model would run half of it): refused. A multi-token-prediction
        layer, numbered after the last (`num_nextn_predict_layers`), is known and skipped."""
        c = self.config
        layers = {int(m[1]) for name in self.dense_sources if (m := re.match(r"layers\.(\d+)\.", name))}
        layers |= {layer for layer, _, _ in self.expert_sources}
        beyond = sorted(i for i in layers if i >= c.n_layers + mtp)
        if beyond:
            raise UserError(f"{self.path}: the checkpoint has layer {beyond[0]}, but config.json declares "
                            f"{c.n_layers} (num_hidden_layers)")
        extra = sorted({e for _, e, _ in self.expert_sources if e >= c.num_experts})
        if extra:
            raise UserError(f"{self.path}: the checkpoint has expert {extra[0]}, but config.json declares "
                            f"{c.num_experts}")

    def _check_complete(self) -> None:
        for name in self.expected_dense():
            if name not in self.dense_sources:
                raise UserError(f"{self.path}: tensor {name} is missing from the checkpoint")
        c = self.config
        if self.layout == "packed":
            placed = {(layer, e) for layer, e, *_ in self.packed_index["experts"]}
            missing = [(layer, e) for layer in c.moe_layers for e in range(c.num_experts)
                       if (layer, e) not in placed]
            if missing:
                raise UserError(f"{self.path}: expert {missing[0]} is missing from the packed index")
            return
        for layer in c.moe_layers:
            for e in range(c.num_experts):
                for part in self.expert_shapes():
                    if (layer, e, part) not in self.expert_sources:
                        raise UserError(f"{self.path}: expert ({layer}, {e}) has no {part} in the checkpoint")

    # -- reading --------------------------------------------------------------------------
    def _open(self, file: Path):
        if self.gguf is not None:  # mapped once, at opening
            return self.gguf
        handle = self._files.get(file)
        if handle is None:
            try:
                if file.suffix == ".safetensors":
                    handle = safe_open(str(file), framework="pt")
                else:
                    handle = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
                    if not isinstance(handle, dict):
                        raise UserError(f"{file} does not hold a dictionary of tensors")
            except UserError:
                raise
            except Exception as e:  # safetensors and torch raise many types for damaged files
                raise UserError(f"cannot read {file.name}: {_short(e)} (truncated or damaged file?)") from None
            self._files[file] = handle
        return handle

    def _keys(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    def read(self, file: Path, key: str, fix=None) -> torch.Tensor:
        handle = self._open(file)
        try:
            if self.gguf is not None:
                t = handle.tensor(key)
            else:
                t = handle.get_tensor(key) if file.suffix == ".safetensors" else handle[key]
        except KeyError:
            raise UserError(f"{file.name}: tensor {key} is missing") from None
        except Exception as e:
            raise UserError(f"cannot read {key} from {file.name}: {_short(e)} (truncated file?)") from None
        if self.fp8 is not None:
            t = self._fp8_weight(key, t)
        return fix(t) if fix is not None else t

    def _fp8_weight(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A block-FP8 weight times its scales, in float32 (`fp8.dequantize`); an FP8 tensor of a module in
        modules_to_not_convert, its values in float32 (no float8 tensor leaves the reader); any other tensor as
        stored. An FP8 weight that needs scales and has none, scales that do not cover its blocks, or a NaN or
        infinite scale: refused, by name."""
        converted = self.fp8.converted(key)
        if not converted or key not in self.fp8.scales:
            if t.dtype not in FLOAT8:
                return t
            if converted:
                raise UserError(f"{self.path}: {key} is {str(t.dtype).removeprefix('torch.')} with no "
                                f"{key}{SCALE_SUFFIX} (block-FP8 scales)")
            return t.float()
        file, scale_key = self.fp8.scales[key]
        scale = self.read(file, scale_key)
        check_scale(key, t, scale_key, scale, self.fp8.block, self.path)
        check_finite((scale.float(),), f"{self.path}: {scale_key}")
        return dequantize(t, scale, self.fp8.block)

    def dtype_of(self, file: Path, key: str) -> torch.dtype:
        """A tensor's dtype without reading its data: a safetensors header, or a memory-mapped torch file."""
        handle = self._open(file)
        try:
            if self.gguf is not None:
                return handle.dtype_of(key)
            if file.suffix != ".safetensors":
                return handle[key].dtype
            name = handle.get_slice(key).get_dtype()
        except KeyError:
            raise UserError(f"{file.name}: tensor {key} is missing") from None
        except Exception as e:
            raise UserError(f"cannot read {key} from {file.name}: {_short(e)} (truncated file?)") from None
        return SAFETENSORS_DTYPES.get(name, name)

    def dense(self, name: str) -> torch.Tensor:
        if self.not_run:  # once, when the weights are read (not before an error that stops the load)
            print(f"note: {self.path.name}: not run, so not read: "
                  f"{', '.join(f'{what} ({n} tensors)' for what, n in self.not_run.items())}", file=sys.stderr)
            self.not_run = {}
        source = self.dense_sources[name]
        if isinstance(source, Joined):
            parts = [self.read(*s) for s in source.sources]
            try:
                t = source.join(self.config, *parts)
            except RuntimeError as e:  # parts of shapes that do not fit together
                keys = ", ".join(key for _, key, _ in source.sources)
                raise UserError(f"{self.path}: tensor {name} cannot be made of {keys} ({_short(e)})") from None
        else:
            t = self.read(*source)
        want = self.expected_dense()[name]
        if self.gguf is not None and [n for n in t.shape if n != 1] == [n for n in want if n != 1]:
            t = t.reshape(want)  # ggml leaves out size-1 dims: Qwen2-MoE's ffn_gate_inp_shexp is [D] for our [1, D]
        if tuple(t.shape) != want:
            raise UserError(f"{self.path}: tensor {name} has shape {list(t.shape)}, config implies {list(want)}")
        return t

    def gguf_expert_kinds(self) -> list[tuple] | None:
        """A GGUF model's expert part types per row (`config.expert_parts` order), None where its experts are all
        floats (or it is no GGUF): what `formats.ggml.GGUFFormat` keeps them in."""
        if self.gguf is None:
            return None
        c, kinds = self.config, []
        for layer in c.moe_layers:
            row = []
            for part in c.expert_parts:
                types = {self.gguf.tensors[self.expert_sources[(layer, e, part)][1]][1].tensor_type
                         for e in range(c.num_experts)}
                if len(types) > 1:  # files of one tensor per expert: each may have its own
                    raise UserError(f"{self.path}: layer {layer}'s experts hold {part} in "
                                    f"{', '.join(sorted(t.name for t in types))}; one type a layer is read")
                row.append(types.pop())
            kinds.append(tuple(row))
        return None if all(k in GGML_FLOATS for row in kinds for k in row) else kinds

    def expert_raw(self, layer: int, expert: int) -> dict[str, tuple]:
        """A GGUF expert's parts as the file holds them: {part: (type, bytes [N, K/bs*ts])}, from its layer's
        stacked tensor (its slice) or its own tensor."""
        out = {}
        for part, (N, K) in self.expert_shapes().items():
            key = self.expert_sources[(layer, expert, part)][1]
            shape = self.gguf.tensor(key).shape
            stacked = len(shape) == 3
            if stacked and shape[0] <= expert:
                raise UserError(f"{self.path}: {key} holds {shape[0]} experts, needs {expert + 1}")
            kind, raw = self.gguf.raw(key, expert if stacked else None)
            if tuple(raw.shape) != (N, row_bytes(kind, K)):
                raise UserError(f"{self.path}: expert ({layer}, {expert}) {part} ({key}) holds {list(raw.shape)} "
                                f"bytes as {kind.name}; the config implies [{N}, {row_bytes(kind, K)}]")
            out[part] = (kind, raw)
        return out

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's parts (`expert_shapes`): weights in checkpoint dtype (block-FP8 ones in float32) and HF
        orientation, or MXFP4 blocks and scales as stored (`mxfp4.parts_for` turns them into weights for the other
        formats)."""
        out = {}
        for part, want in self.expert_shapes().items():
            try:
                t = self.read(*self.expert_sources[(layer, expert, part)])
            except RuntimeError as e:  # a stacked tensor too short to slice
                raise UserError(f"{self.path}: expert ({layer}, {expert}) {part}: {_short(e)}") from None
            if tuple(t.shape) != want:
                raise UserError(
                    f"{self.path}: expert ({layer}, {expert}) {part} has shape {list(t.shape)}, "
                    f"config implies {list(want)}"
                )
            out[part] = t
        return out

    def close(self) -> None:
        self._files.clear()


def linear_attention_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A layer's Gated DeltaNet tensors (`modeling/deltanet.py`), by our name under `attention.`."""
    Hv, Vd = c.linear_v_heads, c.linear_value_dims
    return {"wqkvz.weight": (2 * c.linear_key_dims + 2 * Vd, c.dim), "wba.weight": (2 * Hv, c.dim),
            "conv.weight": (c.conv_dims, 1, c.linear_conv_kernel), "dt_bias": (Hv,), "A_log": (Hv,),
            "norm.weight": (c.linear_v_dim,), "wo.weight": (c.dim, Vd)}


def short_conv_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A layer's short conv tensors (LFM2, `modeling/shortconv.py`), by our name under `attention.`."""
    D = c.dim
    shapes = {"wbcx.weight": (3 * D, D), "conv.weight": (D, 1, c.conv_kernel), "wo.weight": (D, D)}
    if c.conv_bias:
        shapes |= {"wbcx.bias": (3 * D,), "conv.bias": (D,), "wo.bias": (D,)}
    return shapes


def mamba_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A layer's Mamba-2 tensors (Nemotron-H, `modeling/mamba.py`), by our name under `attention.`."""
    H, Cc = c.mamba_heads, c.mamba_conv_dims
    shapes = {"wzxbcdt.weight": (c.mamba_in_rows, c.dim), "conv.weight": (Cc, 1, c.mamba_conv_kernel), "dt_bias": (H,),
              "A_log": (H,), "skip": (H,), "norm": (c.mamba_inner,), "wo.weight": (c.dim, c.mamba_inner)}
    if c.mamba_conv_bias:
        shapes["conv.bias"] = (Cc,)
    if c.mamba_bias:
        shapes |= {"wzxbcdt.bias": (c.mamba_in_rows,), "wo.bias": (c.dim,)}
    return shapes


def mlp_shapes(c: ModelConfig, prefix: str, I: int) -> dict[str, tuple[int, ...]]:
    """A resident MLP's weights (a dense layer's or a shared expert) under `prefix`: w1, w3 [I, D] and w2 [D, I];
    relu2, no w3."""
    return {f"{prefix}{part}.weight": shape for part, shape in c.ffn_shapes(I).items()}


def latent_attention_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A layer's latent attention tensors (DeepSeek's MLA, `modeling/mla.py`), by our name under `attention.`."""
    H, R, dr = c.n_heads, c.kv_lora_rank, c.qk_rope_head_dim
    q = H * c.head_dim
    if c.q_lora_rank:
        Q = c.q_lora_rank
        shapes = {"wq_a.weight": (Q, c.dim), "q_norm.weight": (Q,), "wq_b.weight": (q, Q)}
    else:
        shapes = {"wq.weight": (q, c.dim)}
    return shapes | {"wkv_a.weight": (R + dr, c.dim), "kv_norm.weight": (R,),
                     "wkv_b.weight": (H * (c.head_dim - dr + c.v_head_dim), R), "wo.weight": (c.dim, H * c.v_head_dim)}


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def _rows(start: int, stop: int):
    def take(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] < stop:
            raise RuntimeError(f"stacked tensor has {t.shape[0]} rows, needs {stop}")
        return t[start:stop]

    return take


def _pick(e: int, index: tuple[slice, ...] = (), transposed: bool = False):
    """Expert e of a fused tensor [E, ...], `index` taken from its slice (and the result transposed)."""
    def take(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] <= e:
            raise RuntimeError(f"fused tensor holds {t.shape[0]} experts, needs {e + 1}")
        part = t[e][index]
        return part.T if transposed else part

    return take


def _compose(f, g):
    return lambda t: g(f(t))


def _undo(fix, undo, config: ModelConfig):
    """`fix` (reading), then a GGUF table's `undo(config, tensor)`."""
    return lambda t: undo(config, fix(t))


def _permute(n_heads: int):
    return lambda t: interleaved_to_halves(t, n_heads)

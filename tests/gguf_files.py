"""GGUF files of the tiny transformers checkpoints (`families.py`, `conftest.py`), laid out as llama.cpp's
converter (convert_hf_to_gguf.py) writes them: its tensor names (`gguf.TENSOR_NAMES`), each layer's experts
stacked per part (`ffn_{gate,up,down}_exps`, [E, I, D] and [E, D, I]), the `llama` arch's wq/wk rows interleaved
(`LlamaModel.permute`), its metadata keys; 1-D tensors and the routers in F32 and every other tensor in the
chosen type, by gguf-py's quantizer. With a tokenizer folder, its vocabulary as the converter writes it (`add_vocab`);
`write_vocab_gguf`: a file of that metadata alone."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from conftest import halves_to_interleaved
from gguf import GGMLQuantizationType as Q

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
LAYER = {  # transformers' name in a layer -> llama.cpp's
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_expert.up_proj.weight":
    "ffn_up_shexp.weight", "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
} | {f"self_attn.{x}_proj.{w}": f"attn_{x}.{w}" for x in "qkv" for w in ("weight", "bias")}


def quantized(name: str, t: np.ndarray) -> bool:
    """Whether the converter writes this tensor in the file's type: not the 1-D ones nor the routers."""
    return t.ndim >= 2 and "ffn_gate_inp" not in name


def gguf_tensors(model, family: str, per_expert: bool = False) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and in its layout, float32; `per_expert`: each expert's
    tensors apart (`blk.N.ffn_gate.E.weight`), as llama.cpp wrote Mixtral before it stacked them."""
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, ours in LAYER.items():
            if p + hf in sd:
                out[b + ours] = sd[p + hf]
        if p + "mlp.shared_expert_gate.weight" in sd:  # llama.cpp's is [D]
            out[b + "ffn_gate_inp_shexp.weight"] = sd[p + "mlp.shared_expert_gate.weight"].reshape(-1)
        if p + "mlp.experts.gate_up_proj" in sd:  # [E, 2I, D]: gate rows, then up
            gate, up = sd[p + "mlp.experts.gate_up_proj"].chunk(2, dim=1)
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = gate, up
        if per_expert:
            for part in ("gate", "up", "down"):
                stacked = out.pop(b + f"ffn_{part}_exps.weight")
                out |= {b + f"ffn_{part}.{e}.weight": stacked[e] for e in range(len(stacked))}
        if ARCH[family] == "llama":
            out[b + "attn_q.weight"] = halves_to_interleaved(out[b + "attn_q.weight"], c.num_attention_heads)
            out[b + "attn_k.weight"] = halves_to_interleaved(out[b + "attn_k.weight"], c.num_key_value_heads)
    return {k: v.contiguous().numpy() for k, v in out.items()}


def write_gguf(model, family: str, path: Path, qtype: Q = Q.F32, split_max_tensors: int = 0,
               raw: dict[str, tuple[np.ndarray, Q]] | None = None, per_expert: bool = False,
               qtypes: dict[str, Q] | None = None, tokenizer: Path | None = None, pre: str = "qwen2") -> Path:
    """The model as a GGUF at `path` (split into files of `split_max_tensors` tensors: then the first file's path);
    `raw`: tensors written as these bytes of that type instead; `per_expert`: see `gguf_tensors`; `qtypes`: the
    type of these tensors (llama.cpp's names), instead of `qtype`; `tokenizer`: a folder whose tokenizer goes in too
    (`add_vocab`, `pre`: a byte-level BPE's tokenizer.ggml.pre)."""
    c = model.config
    arch = ARCH[family]
    w = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if getattr(c, "head_dim", None):
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if getattr(c, "clip_qkv", None) is not None:
        w.add_clamp_kqv(c.clip_qkv)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if tokenizer is not None:
        add_vocab(w, tokenizer, pre, c.vocab_size)
    for name, t in gguf_tensors(model, family, per_expert).items():
        if name in (raw or {}):
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif (kind := (qtypes or {}).get(name, qtype)) != Q.F32 and quantized(name, t):
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path if not split_max_tensors else path.with_name(f"{path.stem}-00001-of-{len(w.tensors):05d}.gguf")


def looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`, for these vocabularies: <|...|> is a control token."""
    return token.startswith("<|") and token.endswith("|>")


def add_vocab(w: gguf.GGUFWriter, folder: Path, pre: str = "qwen2", n_vocab: int | None = None) -> None:
    """The folder's tokenizer as metadata, as llama.cpp's converter writes it. A tokenizer.json: byte-level BPE
    (`get_vocab_base` and `_set_vocab_gpt2`): transformers' vocabulary, each id's token (an added one decoded from its
    encoding; CONTROL if special or <|...|>, else USER_DEFINED with its ▁ as spaces), `[PADi]` UNUSED up to `n_vocab`,
    tokenizer.ggml.pre `pre`. A tokenizer.model: SentencePiece, gguf-py's `SentencePieceVocab` (pieces, scores,
    types), and add_space_prefix false where the model adds no space before a text (its add_dummy_prefix, which the
    converter writes for the models that turn it off). Then gguf-py's `SpecialVocab`: merges, the special ids,
    add_bos/add_eos, the chat template."""
    if (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(n_vocab or len(reverse)):
            token = reverse.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            kind = gguf.TokenType.NORMAL
            if token in added:
                if not decoder[i].normalized:
                    token = tok.decode(tok.encode(token, add_special_tokens=False))
                if decoder[i].special or looks_special(token):
                    kind = gguf.TokenType.CONTROL
                else:
                    token, kind = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
            tokens.append(token)
            types.append(kind)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)
    else:
        tokens, scores, types = zip(*gguf.vocab.SentencePieceVocab(folder).all_tokens(), strict=True)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        if not sp.encode("x", out_type=str)[0].startswith("\u2581"):
            w.add_add_space_prefix(False)
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def write_vocab_gguf(folder: Path, path: Path, pre: str = "qwen2", keys: dict | None = None) -> Path:
    """A GGUF of the folder's tokenizer metadata alone (`add_vocab`), no tensors; `keys`: more metadata, written
    over the converter's, a bool, an id or a string ({"tokenizer.ggml.add_bos_token": True})."""
    w = gguf.GGUFWriter(path, "qwen3moe")
    add_vocab(w, folder, pre)
    for key, value in (keys or {}).items():
        kind = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, str: gguf.GGUFValueType.STRING}
        w.add_key_value(key, value, kind[type(value)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def as_decoded(model, qtype: Q, qtypes: dict[str, Q] | None = None):
    """The model with every tensor that `write_gguf` quantizes replaced by gguf-py's decoding of it (the rows
    are quantized along D or I alike in either layout, so this is the file's model in transformers' names);
    `qtypes`: the type of these parameters (transformers' names), instead of `qtype`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                t, kind = p.detach().float().contiguous().numpy(), (qtypes or {}).get(name, qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t, kind), kind)))
    return model

"""Model shape: one dataclass, read from a Hugging Face `config.json` or an original `params.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # D
    n_layers: int  # L
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # I, per expert
    num_experts: int  # E
    top_k: int  # K
    vocab_size: int
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_context: int = 32768
    tie_word_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "num_experts",
                     "top_k", "vocab_size", "max_context"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"config: {self.n_heads} heads are not a multiple of {self.n_kv_heads} kv heads")
        if self.top_k > self.num_experts:
            raise UserError(f"config: top-k {self.top_k} exceeds {self.num_experts} experts")

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: w1, w3 [I, D] and w2 [D, I]."""
        return 3 * self.dim * self.ffn_dim

    @property
    def attention_params(self) -> int:
        """wq, wk, wv and wo of every layer."""
        return self.n_layers * self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)

    @property
    def dense_params(self) -> int:
        """Everything that is not an expert: attention, norms, routers, embeddings, head."""
        per_layer = 2 * self.dim + self.num_experts * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.attention_params + self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    def kv_bytes(self, context: int, bytes_per_value: int) -> int:
        """KV cache for `context` tokens (or the sliding window, if shorter)."""
        length = min(context, self.sliding_window) if self.sliding_window else context
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * length * bytes_per_value

    def to_dict(self) -> dict:
        return asdict(self)

    def to_hf_config(self, dtype=None) -> dict:
        """This shape as a Hugging Face `config.json` (what `from_hf_config` reads back)."""
        out = {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
            "num_local_experts": self.num_experts, "num_experts_per_tok": self.top_k, "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps, "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_context, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "hidden_act": "silu",
        }
        if dtype is not None:
            out["torch_dtype"] = str(dtype).removeprefix("torch.")
        return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _need(data: dict, path: Path, *keys: str):
    for key in keys:
        if key in data and data[key] is not None:
            return data[key]
    raise UserError(f"{path}: missing {keys[0]!r}")


# The architectures the engine implements: config.json's `model_type` -> its `architectures` names. A checkpoint
# of any other kind is refused, even when its tensor names look alike (Phi-3.5-MoE's are Mixtral's).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "mixtral": ("MixtralForCausalLM",),
}


def check_architecture(c: dict, path: Path) -> None:
    """Refuse a config.json whose `model_type` or `architectures` the engine does not implement. One with neither
    key (hand-written) is taken as Mixtral."""
    model_type = None if c.get("model_type") is None else str(c["model_type"])
    architectures = c.get("architectures") or []
    architectures = [str(a) for a in (architectures if isinstance(architectures, list) else [architectures])]
    if model_type is None:
        known = {name for names in SUPPORTED_ARCHITECTURES.values() for name in names}
    else:
        known = set(SUPPORTED_ARCHITECTURES.get(model_type, ()))
    if (model_type is None or model_type in SUPPORTED_ARCHITECTURES) and set(architectures) <= known:
        return
    says = [f"model_type {model_type!r}"] if model_type is not None else []
    if architectures:
        says.append(f"architectures {', '.join(architectures)}")
    supported = ", ".join(f"{t} ({', '.join(a)})" for t, a in SUPPORTED_ARCHITECTURES.items())
    raise UserError(f"{path} says {' and '.join(says)}: offload_moe does not implement it (supported: {supported})")


def from_hf_config(path: Path) -> ModelConfig:
    """`config.json` as written by transformers, old style (top-level rope_theta) or new (rope_parameters)."""
    c = _read_json(path)
    check_architecture(c, path)
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 1e6))
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{path}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    n_heads = int(_need(c, path, "num_attention_heads"))
    dim = int(_need(c, path, "hidden_size"))
    eos = c.get("eos_token_id", 2)
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(_need(c, path, "num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or dim // n_heads),
            ffn_dim=int(_need(c, path, "intermediate_size")),
            num_experts=int(_need(c, path, "num_local_experts")),
            top_k=int(_need(c, path, "num_experts_per_tok")),
            vocab_size=int(_need(c, path, "vocab_size")),
            rope_theta=float(theta),
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            sliding_window=c.get("sliding_window"),
            max_context=int(c.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_id=int(c.get("bos_token_id") or 1),
            eos_id=int((eos[0] if isinstance(eos, list) else eos) or 2),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def from_params_json(path: Path) -> ModelConfig:
    """`params.json` of the original Mistral release."""
    p = _read_json(path)
    moe = p.get("moe") or {}
    try:
        return ModelConfig(
            dim=int(_need(p, path, "dim")),
            n_layers=int(_need(p, path, "n_layers")),
            n_heads=int(_need(p, path, "n_heads")),
            n_kv_heads=int(_need(p, path, "n_kv_heads")),
            head_dim=int(_need(p, path, "head_dim")),
            ffn_dim=int(_need(p, path, "hidden_dim")),
            num_experts=int(_need(moe, path, "num_experts")),
            top_k=int(_need(moe, path, "num_experts_per_tok")),
            vocab_size=int(_need(p, path, "vocab_size")),
            rope_theta=float(p.get("rope_theta", 1e6)),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            sliding_window=p.get("sliding_window"),
            max_context=int(p.get("max_seq_len", 32768)),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None

"""Model shape: one dataclass, read from a Hugging Face `config.json` (each family's reader, in
`models/`, through `hf_common`) or an original `params.json`.

Legend: D dim, L layers, E experts, K top-k, I expert ffn dim.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import UserError

NORMS = ("rms", "layer", "rms_plus_one")
QK_NORMS = ("none", "head", "full")
ROUTERS = ("softmax", "sparsemixer", "sigmoid", "grouped_softmax")
FFN_ACTS = ("swiglu", "relu2")


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
    window_layers: tuple[int, ...] | None = None  # the layers that sliding_window applies to (gpt-oss); None: all
    max_context: int = 32768
    tie_word_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    # the family and its variant of each shared piece (the defaults are Mixtral's)
    family: str = "mixtral"
    eos_ids: tuple[int, ...] = ()  # every id that ends generation (default: eos_id)
    norm: str = "rms"  # rms, layer (LayerNorm with bias), or rms_plus_one (RMSNorm whose weights are stored centred
    # on zero and applied as 1 + w, in float32 before the cast back: Qwen3-Next, QK-norm included)
    qkv_bias: bool = False  # biases of wq wk wv
    o_bias: bool = False  # bias of wo
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: per head (Qwen3) or over the whole projection (OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to +-clip_qkv (OLMoE)
    attention_sinks: bool = False  # a learned logit per head joins each softmax and takes no value (gpt-oss)
    router: str = "softmax"  # softmax then top-k, sparsemixer (Phi-3.5-MoE), sigmoid (DeepSeek-V3, GLM-4.5),
    # or grouped_softmax (DeepSeek-V2: float32 softmax, top-k within the best topk_group of n_group groups, each
    # scored by its best expert; renormalised by norm_topk_prob, else times routed_scaling_factor)
    norm_topk_prob: bool = True  # renormalise the top-k softmax weights
    router_jitter: float = 0.0  # sparsemixer's relative band
    router_bias: bool = False  # the router's linear has a bias (gpt-oss)
    # the sigmoid router: experts chosen by sigmoid + e_score_correction_bias within the best topk_group of
    # n_group groups, weighted by the unbiased sigmoid (renormalised by norm_topk_prob) x routed_scaling_factor;
    # the grouped_softmax router's groups and scale
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_norm_eps: float = 1e-20  # the sigmoid router's renormalisation: over the sum + this (LFM2-MoE: 1e-6)
    shared_ffn_dim: int = 0  # a resident shared expert beside the routed ones (Qwen2-MoE); 0: none
    shared_gate: bool = False  # the shared expert's output scaled by sigmoid(gate . x)
    dense_ffn_dim: int = 0  # the MLP of dense layers
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts
    expert_bias: bool = False  # the routed experts' w1 w3 w2 have biases (gpt-oss)
    swiglu_limit: float | None = None  # the experts' activation: None, silu(gate) * up; a limit, gpt-oss's clamped
    # SwiGLU (`formats.base.clamped_swiglu`)
    lm_head_bias: bool = False
    rope_scaling: dict | None = None  # longrope: short/long factors and mscales, original_max
    partial_rotary_factor: float = 1.0  # RoPE turns the first rotary_dim dims of each head only (GLM-4.5: 0.5)
    # multi-head latent attention (DeepSeek-V2, -V3) when kv_lora_rank > 0: q and k heads of head_dim dims, the
    # last qk_rope_head_dim of them turned by RoPE; values of v_head_dim; keys and values both come from a
    # latent of kv_lora_rank per token, which the KV cache holds with the shared roped key (see `kv_dims`)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: q straight from x (wq); else through a bottleneck of this rank (wq_a, q_norm, wq_b)
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # q's and k's rotary dims come in (even, odd) pairs (DeepSeek), not in halves
    attention_output_gate: bool = False  # wq gives each head's queries then as many gate values; the attention's
    # output is scaled by sigmoid(gate) before wo (Qwen3-Next)
    # Gated DeltaNet linear attention (Qwen3-Next, `modeling/deltanet.py`) on `linear_layers` in place of attention:
    # no KV cache there but a fixed-size state per sequence (`state_bytes`); q and k of linear_k_heads heads of
    # linear_k_dim, v of linear_v_heads of linear_v_dim, through a causal conv of linear_conv_kernel taps
    linear_layers: tuple[int, ...] = ()
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv_kernel: int = 4
    # LFM2's gated short convolutions (`modeling/shortconv.py`) on `conv_layers` in place of attention: no KV cache
    # there but the conv's last conv_kernel-1 inputs per sequence (`state_bytes`); conv_bias: biases on its
    # projections and its conv
    conv_layers: tuple[int, ...] = ()
    conv_kernel: int = 3
    conv_bias: bool = False
    # Mamba-2 (Nemotron-H, `modeling/mamba.py`) on `mamba_layers` in place of attention: no KV cache there but the
    # conv's last inputs and the SSM state per sequence (`state_bytes`); mamba_heads heads of mamba_head_dim, B and
    # C in mamba_groups groups of mamba_state, a causal conv of mamba_conv_kernel taps, prompts in chunks of
    # mamba_chunk; the time step clamped to [mamba_dt_min, mamba_dt_max] (None: no upper bound)
    mamba_layers: tuple[int, ...] = ()
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 1
    mamba_state: int = 0
    mamba_conv_kernel: int = 4
    mamba_chunk: int = 128
    mamba_bias: bool = False  # biases on its in and out projections
    mamba_conv_bias: bool = True
    mamba_dt_min: float = 0.0
    mamba_dt_max: float | None = None
    # layers of one piece (Nemotron-H: each layer a mixer or an FFN, with one norm): mixer_only layers have no FFN
    # (their norm is attention_norm), ffn_only layers no attention (their norm is ffn_norm)
    mixer_only: tuple[int, ...] = ()
    ffn_only: tuple[int, ...] = ()
    # the experts', shared expert's and dense MLPs' activation: swiglu, w2 . (silu(w1 x) * w3 x) (gpt-oss's clamped
    # form where swiglu_limit is set), or relu2, w2 . relu(w1 x)^2 with no w3 (Nemotron-H)
    ffn_act: str = "swiglu"

    def __post_init__(self) -> None:
        for name in ("eos_ids", "dense_layers", "linear_layers", "conv_layers", "mamba_layers", "mixer_only",
                     "ffn_only"):  # JSON gives lists
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if self.window_layers is not None:
            object.__setattr__(self, "window_layers", tuple(int(i) for i in self.window_layers))
        if not self.eos_ids:
            object.__setattr__(self, "eos_ids", (self.eos_id,))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "num_experts",
                     "top_k", "vocab_size", "max_context"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise UserError(f"config: rms_norm_eps ({self.norm_eps}) and rope_theta ({self.rope_theta}) must be "
                            "positive")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"config: {self.n_heads} heads are not a multiple of {self.n_kv_heads} kv heads")
        if self.top_k > self.num_experts:
            raise UserError(f"config: top-k {self.top_k} exceeds {self.num_experts} experts")
        for name, allowed in (("norm", NORMS), ("qk_norm", QK_NORMS), ("router", ROUTERS), ("ffn_act", FFN_ACTS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"config: {name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.window_layers is not None and not self.sliding_window:
            raise UserError("config: window_layers names the layers of a sliding window, but there is none")
        if not self.moe_layers:
            raise UserError("config: every layer is dense; this engine runs models with experts")
        if self.dense_layers and self.dense_ffn_dim <= 0:
            raise UserError("config: dense layers need the dense MLP size (intermediate_size)")
        if self.kv_lora_rank and not (0 < self.qk_rope_head_dim < self.head_dim and self.qk_rope_head_dim % 2 == 0
                                      and self.v_head_dim > 0 and self.q_lora_rank >= 0):
            raise UserError(f"config: latent attention with head dim {self.head_dim}, rope dims {self.qk_rope_head_dim}"
                            f" and value dims {self.v_head_dim}: rope dims must be even, fewer than the head's")
        if self.kv_lora_rank and (self.sliding_window or self.qkv_bias or self.o_bias or self.qk_norm != "none"):
            raise UserError("config: latent attention has no sliding window, attention biases or QK-norm here")
        if self.linear_layers and not (
                min(self.linear_k_heads, self.linear_k_dim, self.linear_v_dim, self.linear_conv_kernel) > 0
                and self.linear_v_heads % self.linear_k_heads == 0 and self.linear_v_heads > 0):
            raise UserError(f"config: linear attention with {self.linear_k_heads} key heads of {self.linear_k_dim} "
                            f"and {self.linear_v_heads} value heads of {self.linear_v_dim}, kernel "
                            f"{self.linear_conv_kernel}: sizes must be positive, value heads a multiple of key heads")
        if self.linear_layers and (self.kv_lora_rank or not set(self.linear_layers) <= set(range(self.n_layers))):
            raise UserError(f"config: linear attention layers {list(self.linear_layers)} must be among the "
                            f"{self.n_layers} layers, without latent attention")
        if self.conv_layers and (self.conv_kernel <= 0 or self.kv_lora_rank or set(self.conv_layers) & set(
                self.linear_layers) or not set(self.conv_layers) <= set(range(self.n_layers))):
            raise UserError(f"config: short conv layers {list(self.conv_layers)} (kernel {self.conv_kernel}) must be "
                            f"among the {self.n_layers} layers, a positive kernel, without latent or linear attention")
        if not (0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise UserError(f"config: partial_rotary_factor {self.partial_rotary_factor} gives {self.rotary_dim} "
                            f"rotary dims of {self.head_dim}; they must be even (0: no RoPE)")
        self._check_pieces()
        if self.router in ("sigmoid", "grouped_softmax"):
            groups, keep = self.n_group, self.topk_group
            if groups <= 0 or self.num_experts % groups or not 0 < keep <= groups or (
                    self.router == "sigmoid" and groups > 1 and self.num_experts // groups < 2):  # scored by its best 2
                raise UserError(f"config: {self.num_experts} experts in n_group {groups} groups, topk_group {keep}")
            if self.top_k > keep * (self.num_experts // groups):
                raise UserError(f"config: top-k {self.top_k} exceeds the experts of {keep} kept groups")

    def _check_pieces(self) -> None:
        """Mamba-2 sizes, and the layers of one piece: each a layer of the model, none both."""
        layers = set(range(self.n_layers))
        if self.mamba_layers and not (
                min(self.mamba_heads, self.mamba_head_dim, self.mamba_state, self.mamba_conv_kernel,
                    self.mamba_chunk, self.mamba_groups) > 0 and self.mamba_heads % self.mamba_groups == 0
                and set(self.mamba_layers) <= layers and not self.kv_lora_rank
                and not set(self.mamba_layers) & set(self.linear_layers + self.conv_layers)):
            raise UserError(f"config: Mamba layers {list(self.mamba_layers)} with {self.mamba_heads} heads of "
                            f"{self.mamba_head_dim} in {self.mamba_groups} groups, state {self.mamba_state}, kernel "
                            f"{self.mamba_conv_kernel}: sizes must be positive, heads a multiple of groups, layers "
                            "among the model's, without latent, linear attention or short convs")
        if set(self.mixer_only) & set(self.ffn_only) or not set(self.mixer_only + self.ffn_only) <= layers:
            raise UserError(f"config: mixer-only layers {list(self.mixer_only)} and FFN-only layers "
                            f"{list(self.ffn_only)} must be distinct layers of the {self.n_layers}")
        if set(self.ffn_only) & set(self.mamba_layers + self.linear_layers + self.conv_layers):
            raise UserError("config: an FFN-only layer cannot also be a Mamba, linear attention or short conv layer")
        if self.ffn_act == "relu2" and (self.swiglu_limit is not None or self.shared_gate or self.expert_bias):
            raise UserError("config: relu2 experts have no swiglu limit, shared gate or expert biases here")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """`to_dict`'s output back (a trace's metadata); keys of a newer version are refused."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"config: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**d)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers that have experts, in order; the expert cache's rows are these."""
        return tuple(i for i in range(self.n_layers) if i not in self.dense_layers and i not in self.mixer_only)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE turns (the first ones; the rest pass unchanged), as transformers;
        with latent attention, the last qk_rope_head_dim."""
        return self.qk_rope_head_dim if self.kv_lora_rank else int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """What the KV cache holds per token and layer: (heads, key dims, value dims). Latent attention
        caches one row per token, the normed latent (kv_lora_rank) and the roped shared key
        (qk_rope_head_dim) side by side as its key, and no value: the values come from the latent."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, 0
        return self.n_kv_heads, self.head_dim, self.head_dim

    @property
    def attention_inputs(self) -> tuple[int, ...]:
        """The input sizes of the attention projections that int8 attention quantizes: D (wq wk wv, linear
        attention's wqkvz), H*hd (wo), linear attention's value heads x dims (its wo);
        latent attention: D (wq or wq_a, wkv_a), q_lora_rank (wq_b), H*v_head_dim (wo); Mamba-2's inner width (wo)."""
        if self.kv_lora_rank:
            return (self.dim, *([self.q_lora_rank] if self.q_lora_rank else []), self.n_heads * self.v_head_dim)
        linear = (self.linear_v_heads * self.linear_v_dim,) if self.linear_layers else ()  # linear attention's wo
        mamba = (self.mamba_inner,) if self.mamba_layers else ()
        return self.dim, self.n_heads * self.head_dim, *linear, *mamba

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def row_of(self) -> dict[int, int]:
        """layer -> its row among the layers with experts."""
        return {layer: row for row, layer in enumerate(self.moe_layers)}

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: w1, w3 [I, D] and w2 [D, I] (and their biases [I], [I], [D]); relu2: no w3."""
        return self.ffn_mats * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim) * self.expert_bias

    @property
    def ffn_mats(self) -> int:
        """Matrices of an expert, a shared expert or a dense MLP: w1, w3 and w2 (swiglu), or w1 and w2 (relu2)."""
        return 3 if self.ffn_act == "swiglu" else 2

    @property
    def expert_parts(self) -> tuple[str, ...]:
        """An expert's weights by our names: w1 (gate; relu2's up), w3 (up, swiglu only) [I, D], w2 [D, I]."""
        return ("w1", "w3", "w2") if self.ffn_act == "swiglu" else ("w1", "w2")

    def ffn_shapes(self, ffn: int | None = None) -> dict[str, tuple[int, int]]:
        """Each of `expert_parts`' shapes in an FFN of `ffn` (default: an expert's I): w1, w3 [I, D], w2 [D, I]."""
        I = ffn or self.ffn_dim
        return {part: (self.dim, I) if part == "w2" else (I, self.dim) for part in self.expert_parts}

    @property
    def mamba_inner(self) -> int:
        """Mamba-2's x, z and output width: heads x head dims."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_conv_dims(self) -> int:
        """Channels of Mamba-2's causal conv: x, B and C side by side."""
        return self.mamba_inner + 2 * self.mamba_groups * self.mamba_state

    @property
    def mamba_in_rows(self) -> int:
        """Rows of Mamba-2's in projection: z, then x, B and C, then the time step per head."""
        return self.mamba_inner + self.mamba_conv_dims + self.mamba_heads

    @property
    def attention_params(self) -> int:
        """wq, wk, wv and wo of every layer (their weights: what int8 attention quantizes); latent attention:
        wq (or wq_a and wq_b), wkv_a and wo (wkv_b stays in the compute dtype: decode reads it per head);
        linear attention: wqkvz and wo (its small wba stays in the compute dtype); short convs: wbcx and wo;
        Mamba-2: wzxbcdt and wo."""
        D, H, hd = self.dim, self.n_heads, self.head_dim
        if self.kv_lora_rank:
            Q = self.q_lora_rank
            q = Q * (D + H * hd) if Q else D * H * hd
            return self.n_layers * (q + D * (self.kv_lora_rank + self.qk_rope_head_dim) + H * self.v_head_dim * D)
        wq = H * (1 + self.attention_output_gate)  # the output gate's rows come with wq's
        linear = len(self.linear_layers) * D * (2 * self.linear_key_dims + 3 * self.linear_value_dims)  # wqkvz, wo
        short = len(self.conv_layers) * 4 * D * D  # wbcx [3D, D], wo [D, D]
        mamba = len(self.mamba_layers) * D * (self.mamba_in_rows + self.mamba_inner)  # wzxbcdt, wo
        return self.n_attention_layers * D * hd * (wq + H + 2 * self.n_kv_heads) + linear + short + mamba

    @property
    def dense_params(self) -> int:
        """Everything that is not a routed expert: attention (biases, QK norms), norms, routers,
        shared experts, dense MLP layers, embeddings, head (and the sigmoid router's correction bias); linear
        attention's small tensors; the short convs' taps (and biases); Mamba-2's conv, per-head tensors and norm
        (and biases)."""
        H, G, hd, D = self.n_heads, self.n_kv_heads, self.head_dim, self.dim
        norm = 2 * D if self.norm == "layer" else D
        if self.kv_lora_rank:  # wkv_b [H*(nope + v), R] and the norms of the latents
            R = self.kv_lora_rank
            extra = R * H * (hd - self.qk_rope_head_dim + self.v_head_dim) + R + self.q_lora_rank
        else:
            extra = ((H * (1 + self.attention_output_gate) + 2 * G) * hd * self.qkv_bias + D * self.o_bias
                     + {"none": 0, "head": 2 * hd, "full": (H + G) * hd}[self.qk_norm])
        Hv, Kd = self.linear_v_heads, self.linear_key_dims  # wba, conv, dt_bias, A_log, the gated norm
        linear = 2 * Hv * D + (2 * Kd + self.linear_value_dims) * self.linear_conv_kernel + 2 * Hv + self.linear_v_dim
        short = self.dim * self.conv_kernel + 5 * self.dim * self.conv_bias  # taps [D, W]; biases 3D, D, D
        mamba = (self.mamba_conv_dims * (self.mamba_conv_kernel + self.mamba_conv_bias) + 3 * self.mamba_heads
                 + self.mamba_inner + (self.mamba_in_rows + D) * self.mamba_bias)  # conv, dt_bias A_log D, norm
        attn = (self.attention_params + self.n_attention_layers * extra + len(self.linear_layers) * linear
                + len(self.conv_layers) * short + len(self.mamba_layers) * mamba)
        router = self.num_experts * (D + (self.router == "sigmoid") + self.router_bias)  # + either bias
        moe = self.n_moe_layers * (router + self.ffn_mats * D * self.shared_ffn_dim + D * self.shared_gate)
        dense = len(self.dense_layers) * self.ffn_mats * D * self.dense_ffn_dim
        head = (0 if self.tie_word_embeddings else self.vocab_size * D) + self.vocab_size * self.lm_head_bias
        sinks = self.n_attention_layers * H * self.attention_sinks
        norms = 2 * self.n_layers - len(self.mixer_only) - len(self.ffn_only)  # one in a layer of one piece
        return attn + sinks + norms * norm + moe + dense + self.vocab_size * D + head + norm

    def kv_bytes(self, context: int, bytes_per_value: int) -> int:
        """What one sequence of `context` tokens keeps: the KV cache (each layer's sliding window, if shorter;
        latent attention's latents) and the linear attention and short conv layers' state (`state_bytes`)."""
        heads, k, v = self.kv_dims
        kv = heads * (k + v) * bytes_per_value * sum(self.kv_length(i, context) for i in range(self.n_layers))
        return kv + self.state_bytes(bytes_per_value)

    @property
    def n_attention_layers(self) -> int:
        """Layers with attention (a KV cache), not linear attention, a short conv, Mamba-2 or an FFN alone."""
        return sum(self.has_attention(i) for i in range(self.n_layers))

    def has_attention(self, layer: int) -> bool:
        """Whether `layer` mixes tokens by attention (and keeps a KV cache)."""
        return layer not in self.linear_layers + self.conv_layers + self.mamba_layers + self.ffn_only

    @property
    def linear_key_dims(self) -> int:
        """Linear attention's q (and k) width: key heads x key dims."""
        return self.linear_k_heads * self.linear_k_dim

    @property
    def linear_value_dims(self) -> int:
        """Linear attention's v (and z, and output) width: value heads x value dims."""
        return self.linear_v_heads * self.linear_v_dim

    @property
    def conv_dims(self) -> int:
        """Channels of linear attention's causal conv: q, k and v side by side."""
        return 2 * self.linear_key_dims + self.linear_value_dims

    def state_bytes(self, bytes_per_value: int) -> int:
        """The fixed-size state one sequence keeps in the linear attention layers, whatever its length: the
        conv's last kernel-1 inputs [conv_dims, kernel-1] in the compute dtype, and the delta rule's state
        [value heads, key dims, value dims] in float32; in the short conv layers, the conv's last
        conv_kernel-1 inputs [D, conv_kernel-1] in the compute dtype; in the Mamba-2 layers, the conv's last
        inputs [mamba_conv_dims, kernel-1] in the compute dtype and the SSM state [heads, state, head dims] in
        float32."""
        conv = self.conv_dims * (self.linear_conv_kernel - 1) * bytes_per_value
        recurrent = self.linear_v_heads * self.linear_k_dim * self.linear_v_dim * 4
        short = self.dim * (self.conv_kernel - 1) * bytes_per_value
        mamba = (self.mamba_conv_dims * (self.mamba_conv_kernel - 1) * bytes_per_value
                 + self.mamba_inner * self.mamba_state * 4)
        return (len(self.linear_layers) * (conv + recurrent) + len(self.conv_layers) * short
                + len(self.mamba_layers) * mamba)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention, None where it sees the whole context."""
        if self.window_layers is not None and layer not in self.window_layers:
            return None
        return self.sliding_window

    def kv_length(self, layer: int, context: int) -> int:
        """Positions `layer`'s KV cache holds for `context` tokens: the context, or its sliding window if shorter
        (a ring: see `layers.KVCache`); none in a layer without attention."""
        if not self.has_attention(layer):  # a state instead (`state_bytes`), or nothing
            return 0
        window = self.window_of(layer)
        return min(context, window) if window else context

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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def need(data: dict, path: Path, *keys: str):
    """The first of `keys` that `data` has (a family's names for one count: a whole number), else a clear error."""
    for key in keys:
        if key in data and data[key] is not None:
            value = data[key]
            whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()
            if isinstance(value, bool) or not whole:
                raise UserError(f"{path}: {key} must be a whole number, got {value!r}")
            return int(value)
    raise UserError(f"{path}: missing {keys[0]!r}")


# config.json keys every family reads alike that must be numbers when present (a string or a boolean there is
# a broken file: refused with its name, not converted, `true` as 1, or a traceback)
NUMBERS = ("rope_theta", "rms_norm_eps", "max_position_embeddings", "num_key_value_heads", "head_dim",
           "bos_token_id", "partial_rotary_factor", "routed_scaling_factor", "n_group", "topk_group",
           "first_k_dense_replace", "moe_layer_freq", "intermediate_size")


def check_numbers(c: dict, path: Path) -> None:
    for key in NUMBERS:
        value = c.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value)):
            raise UserError(f"{path}: {key} must be a finite number, got {value!r}")


def rope_of(c: dict, path: Path) -> tuple[float, dict | None]:
    """(theta, scaling) from either style: top-level `rope_theta` and `rope_scaling`, or transformers 5's
    `rope_parameters`. Scaling: None, longrope's factors (Phi-3.5) or YaRN's parameters (gpt-oss, DeepSeek)."""
    params = c.get("rope_parameters") or {}
    old = c.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", c.get("rope_theta", 1e6)))
    scaling = {**old, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind in ("longrope", "su"):
        try:
            return theta, {"type": "longrope", "short_factor": [float(f) for f in scaling["short_factor"]],
                           "long_factor": [float(f) for f in scaling["long_factor"]],
                           "original_max": int(scaling.get("original_max_position_embeddings")
                                               or c["original_max_position_embeddings"]),
                           "short_mscale": float(scaling.get("short_mscale", 1.0)),
                           "long_mscale": float(scaling.get("long_mscale", 1.0))}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: longrope scaling is incomplete ({e})") from None
    if kind == "yarn":
        try:
            return theta, yarn_of(scaling, c)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"{path}: yarn scaling is incomplete ({e})") from None
    raise UserError(f"{path}: RoPE scaling {kind!r} is not supported (default, longrope, yarn)")


def yarn_of(s: dict, c: dict) -> dict:
    """YaRN's parameters as transformers reads them (gpt-oss, DeepSeek): without `factor`, the ratio of
    the context to the original; the attention factor (cos, sin times it) from `attention_factor`, or
    from log(factor) and DeepSeek's `mscale` / `mscale_all_dim`, whose ratio it is."""
    original = int(s.get("original_max_position_embeddings") or c["original_max_position_embeddings"])
    factor = s.get("factor")
    factor = float(factor) if factor is not None else c["max_position_embeddings"] / original
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    attention = s.get("attention_factor")
    if attention is None:
        if mscale and mscale_all_dim:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention = yarn_mscale(factor)
    return {"type": "yarn", "factor": factor, "original_max": original,
            "beta_fast": float(s.get("beta_fast") or 32), "beta_slow": float(s.get("beta_slow") or 1),
            "truncate": bool(s.get("truncate", True)), "attention_factor": float(attention),
            "mscale": float(mscale or 0), "mscale_all_dim": float(mscale_all_dim or 0)}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times the original (1 at or below it)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def hf_common(c: dict, path: Path, **family) -> ModelConfig:
    """A config.json's keys that every family names alike, plus the family's own (`family`:
    ModelConfig fields, e.g. ffn_dim, num_experts and the variants)."""
    theta, scaling = rope_of(c, path)
    n_heads = int(need(c, path, "num_attention_heads"))
    dim = int(need(c, path, "hidden_size"))
    eos = c.get("eos_token_id", 2)
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None] or [2]
    common = dict(
        dim=dim,
        n_layers=int(need(c, path, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
        head_dim=int(c.get("head_dim") or dim // n_heads),
        top_k=int(need(c, path, "num_experts_per_tok")),
        vocab_size=int(need(c, path, "vocab_size")),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        sliding_window=c.get("sliding_window") or None,
        max_context=int(c.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_id=int(c.get("bos_token_id") or 1),
        eos_id=eos_ids[0],
        eos_ids=tuple(eos_ids),
    )
    try:
        return ModelConfig(**(common | family))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def from_params_json(path: Path) -> ModelConfig:
    """`params.json` of the original Mistral release."""
    p = read_json(path)
    moe = p.get("moe") or {}
    try:
        return ModelConfig(
            dim=int(need(p, path, "dim")),
            n_layers=int(need(p, path, "n_layers")),
            n_heads=int(need(p, path, "n_heads")),
            n_kv_heads=int(need(p, path, "n_kv_heads")),
            head_dim=int(need(p, path, "head_dim")),
            ffn_dim=int(need(p, path, "hidden_dim")),
            num_experts=int(need(moe, path, "num_experts")),
            top_k=int(need(moe, path, "num_experts_per_tok")),
            vocab_size=int(need(p, path, "vocab_size")),
            rope_theta=float(p.get("rope_theta", 1e6)),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            sliding_window=p.get("sliding_window"),
            max_context=int(p.get("max_seq_len", 32768)),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None

"""Train the tiny Mixtral-layout MoE shipped in `offload_moe/data/tiny-moe/`, on CPU, from the standard library.

Why: random-weight checkpoints route experts almost uniformly, so cache hit rates, routing locality
and prefetch recall measured on them mean nothing, and their text is gibberish. A small model
trained on real text routes like a real MoE (experts specialise, consecutive tokens and adjacent
layers agree), which is what the offloading engine exploits.

    python tools/train_tiny_moe.py                                   # ~25 min on 2 cores
    python tools/train_tiny_moe.py --time-budget 1 --out /tmp/smoke  # a one-minute smoke run
    python tools/train_tiny_moe.py --experts 32 --top-k 4 --ffn 64 --threads 1 --time-budget 12 \
        --tokenizer offload_moe/data/tiny-moe/tokenizer.model --out offload_moe/data/tiny-moe-fine
                                       # the fine-grained demo: same expert parameters, 4x the experts

Corpus: the `.py` files of this Python's standard library (PSF licence), which every install
carries. Skipped: site-packages, test folders (`test`, `tests`, `idle_test`), and generated files
(the `_sysconfigdata_*` build records, files over 256 KB such as `pydoc_data/topics.py`, and files
whose first 1000 characters say `gencodec.py` or `do not edit`, i.e. codec and stringprep tables).
Held out, never trained on (neither the model nor the tokenizer): a file whose relative POSIX path
`p` has `int(sha256(p)[:8], 16) % 20 == 0`, about 5% of the files (`is_held_out`).

Model: plain PyTorch, batched for training; only the RoPE tables and rotation are the engine's
(`offload_moe.modeling.transformer`). RMSNorm, grouped-query
attention with rotate-halves RoPE (the Hugging Face Mixtral convention), a router per layer
(softmax over all experts in float32, top-k, renormalised), SiLU-gated experts
y = w2(silu(w1 x) * w3 x), tied embeddings, and the Switch-style load-balancing loss so that every
expert is used. Tokenizer: a sentencepiece BPE vocabulary trained here on the training files
(unk 0, bos 1, eos 2, byte fallback: Mixtral's conventions; 4096 pieces, since the real 32000 would
not fit the size limit). `--tokenizer` reuses a trained one instead, so that two models share one
vocabulary and score the same held-out tokens.

Schedule: AdamW, linear warmup, constant, then a linear cooldown over the last 20% of the steps
("warmup-stable-decay"). With a time budget, the cooldown starts when 80% of the budget is spent
and lasts a quarter of the steps done by then, so the run ends near the budget whatever else shares
the cores; the step count it reached is printed, and `--steps N --time-budget 0` replays that run
(same seed, same batches, same learning rates).

Output (`--out`): config.json, model.safetensors (float16) and tokenizer.model, in the Hugging Face
Mixtral layout that the engine and transformers read.

Legend for shape comments: B batch, T tokens, D dim, H heads, G kv heads, hd head dim, E experts,
K top-k, I ffn dim, V vocab, N tokens of a flattened batch (B*T).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait lose whole time slices when other processes share the
# cores, which made every small elementwise kernel ~10x slower here; passive waiting avoids that.
# It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offload_moe.config import ModelConfig  # noqa: E402
from offload_moe.modeling.layers import apply_rope, rope_tables  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "offload_moe" / "data" / "tiny-moe"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}
MAX_FILE_BYTES = 256 * 1024
GENERATED_MARKS = ("gencodec.py", "do not edit")
UNK, BOS, EOS = 0, 1, 2


# -- corpus ---------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(rel: str) -> bool:
    """The held-out rule: 1 file in 20 by a hash of its relative POSIX path, stable across runs and machines."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 20 == 0


def is_generated(path: Path, text: str) -> bool:
    """Machine-made tables teach nothing about Python and would dominate a small corpus."""
    head = text[:1000].lower()
    return (path.name.startswith("_sysconfigdata_") or path.stat().st_size > MAX_FILE_BYTES
            or any(mark in head for mark in GENERATED_MARKS))


def corpus_files(root: Path | None = None) -> dict[str, str]:
    """Relative path -> text of every corpus file, sorted by path (so the order is the same everywhere)."""
    root = root or stdlib_root()
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts) or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not is_generated(path, text):
            files[rel.as_posix()] = text
    return files


def split_corpus(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(train, held-out) by `is_held_out`."""
    train = {k: v for k, v in files.items() if not is_held_out(k)}
    held = {k: v for k, v in files.items() if is_held_out(k)}
    return train, held


def tokenizer_lines(texts: list[str]) -> Iterator[str]:
    """The non-blank lines, newline dropped, indentation kept (no whitespace normalisation below).

    No piece may hold a newline, so a newline is always its own token (the byte piece <0x0A>, as in
    Mixtral's vocabulary). Otherwise pieces such as '):\\n' form, and a prompt that ends in '):'
    ends on a token that the model, in training, almost never saw followed by a newline: it then
    continues the line instead of starting the body."""
    for text in texts:
        yield from (line for line in text.splitlines() if line.strip())


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model (serialized) with Mixtral's special ids and byte fallback.

    Identity normalisation and no dummy prefix, so that code round-trips exactly: a prompt is
    tokenized as it would be at the start of a line in a file."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=tokenizer_lines(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=True, character_coverage=0.9999, max_sentence_length=8192, num_threads=2, minloglevel=2,
    )
    return model.getvalue()


def encode_stream(sp: spm.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    """All texts as one token stream, each file as BOS ... EOS. [tokens] int64"""
    ids: list[int] = []
    for text in texts:
        ids.append(BOS)
        ids.extend(sp.encode(text))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int64)


# -- model ----------------------------------------------------------------------------------------
# the shipped shape; `--dim`, `--layers`, `--ffn`, `--experts`, `--top-k` and `--seq-len` (max_context) vary it
TINY = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=16, ffn_dim=256, num_experts=8, top_k=2,
                   vocab_size=4096, rope_theta=10000.0, norm_eps=1e-5, max_context=256, tie_word_embeddings=True,
                   bos_id=BOS, eos_id=EOS)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, s: ModelConfig):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.dim, s.n_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.dim, s.n_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, s.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, hd = self.s.n_heads, self.s.n_kv_heads, self.s.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # [B, T, H*hd] -> [B, H, T, hd]
        k = self.k_proj(x).view(B, T, G, hd).transpose(1, 2)  # [B, T, G*hd] -> [B, G, T, hd]
        v = self.v_proj(x).view(B, T, G, hd).transpose(1, 2)  # [B, T, G*hd] -> [B, G, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # query head h reads kv head h // (H/G), as transformers' repeat_kv
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, H, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * hd))  # [B, H, T, hd] -> [B, T, H*hd]


class SparseMoE(nn.Module):
    """Router and experts. Experts are stacked [E, ...] for training and split per expert when saved."""

    def __init__(self, s: ModelConfig):
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.dim, s.num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(s.num_experts, s.ffn_dim, s.dim))  # [E, I, D]
        self.w3 = nn.Parameter(torch.empty(s.num_experts, s.ffn_dim, s.dim))  # [E, I, D]
        self.w2 = nn.Parameter(torch.empty(s.num_experts, s.dim, s.ffn_dim))  # [E, D, I]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> probs [N, E] (float32, all experts), weights [N, K] (renormalised), idx [N, K]."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [N, E]
        weights, idx = torch.topk(probs, self.s.top_k, dim=-1)  # [N, K]
        return probs, weights / weights.sum(-1, keepdim=True), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] normed hidden states -> output [N, D], load-balancing loss (1.0 when balanced), idx [N, K]."""
        E, K = self.s.num_experts, self.s.top_k
        probs, weights, idx = self.route(x)
        flat = idx.reshape(-1)  # [N, K] -> [N*K], assignment a = token * K + rank
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=E)  # [E]
        token = order // K  # [N*K] the token of each grouped assignment
        xs = x[token]  # [N*K, D]
        outs = []
        for e, chunk in enumerate(xs.split(counts.tolist())):
            outs.append((F.silu(chunk @ self.w1[e].T) * (chunk @ self.w3[e].T)) @ self.w2[e].T)  # [n_e, D]
        ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)  # [N*K, D]
        out = torch.zeros_like(x).index_add_(0, token, ys)  # [N, D]
        # Switch / Mixtral load balancing: E * sum_e (share of assignments to e) * (mean router prob of e)
        share = counts.float() / flat.numel()  # [E]
        aux = E * (share * probs.mean(0)).sum()
        return out, aux, idx


class Block(nn.Module):
    def __init__(self, s: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(s.dim, s.norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.dim, s.norm_eps)
        self.block_sparse_moe = SparseMoE(s)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = h.shape
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        out, aux, _ = self.block_sparse_moe(self.post_attention_layernorm(h).reshape(B * T, D))  # [B*T, D]
        return h + out.view(B, T, D), aux  # [B*T, D] -> [B, T, D]


class TinyMixtral(nn.Module):
    def __init__(self, s: ModelConfig):
        super().__init__()
        self.s = s
        self.embed_tokens = nn.Embedding(s.vocab_size, s.dim)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.norm_eps)
        cos, sin = rope_tables(s.head_dim, s.rope_theta, s.max_context, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """std 0.02, and 0.02 / sqrt(2 L) for the projections that write into the residual stream (GPT-2)."""
        out_std = 0.02 / math.sqrt(2 * self.s.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                continue
            std = out_std if name.endswith(("o_proj.weight", ".w2")) else 0.02
            nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V] (output tied to the embedding), mean load-balancing loss."""
        T = tokens.shape[1]
        h = self.embed_tokens(tokens)  # [B, T, D]
        cos, sin = self.cos[:T], self.sin[:T]
        aux = h.new_zeros(())
        for blk in self.layers:
            h, a = blk(h, cos, sin)
            aux = aux + a
        return F.linear(self.norm(h), self.embed_tokens.weight), aux / len(self.layers)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- training -------------------------------------------------------------------------------------
def batch_at(stream: torch.Tensor, starts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of windows starting at `starts` [B]. Each [B, T]."""
    idx = starts[:, None] + torch.arange(T + 1)[None, :]  # [B, T+1]
    win = stream[idx]  # [B, T+1]
    return win[:, :-1], win[:, 1:]


@torch.no_grad()
def evaluate(model: TinyMixtral, stream: torch.Tensor, T: int, batch: int, max_windows: int | None = None) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the stream (all of it, or the first few)."""
    model.eval()
    n = (stream.numel() - 1) // T
    if max_windows is not None:
        n = min(n, max_windows)
    starts = torch.arange(n) * T
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x, y = batch_at(stream, starts[i : i + batch], T)
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()  # [B*T, V]
        count += y.numel()
    model.train()
    return total / count


@torch.no_grad()
def expert_shares(model: TinyMixtral, stream: torch.Tensor, T: int, windows: int) -> list[list[float]]:
    """Per layer, the share of top-k assignments each expert receives on the first held-out windows."""
    model.eval()
    E = model.s.num_experts
    counts = torch.zeros(model.s.n_layers, E)
    x, _ = batch_at(stream, torch.arange(windows) * T, T)
    B, _ = x.shape
    h = model.embed_tokens(x)  # [B, T, D]
    cos, sin = model.cos[:T], model.sin[:T]
    for i, blk in enumerate(model.layers):
        a = h + blk.self_attn(blk.input_layernorm(h), cos, sin)
        _, _, idx = blk.block_sparse_moe(blk.post_attention_layernorm(a).reshape(B * T, -1))  # [B*T, D]
        counts[i] = torch.bincount(idx.reshape(-1), minlength=E).float()  # [B*T, K] -> [B*T*K]
        h, _ = blk(h, cos, sin)
    model.train()
    return (counts / counts.sum(1, keepdim=True)).tolist()


def learning_rate(step: int, peak: float, warmup: int, decay_start: int, total: int) -> float:
    """Warmup-stable-decay: linear up, flat, then linear down to 1% of the peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    left = (total - step) / max(total - decay_start, 1)
    return peak * (0.01 + 0.99 * max(left, 0.0))


def optimizer_for(model: TinyMixtral, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Weight decay on matrices (embedding, projections, router, experts), not on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


# -- saving ---------------------------------------------------------------------------------------
def hf_config(s: ModelConfig) -> dict:
    """The engine's config.json for the shape, plus the training settings transformers keeps."""
    return {**s.to_hf_config(torch.float16), "attention_dropout": 0.0, "initializer_range": 0.02,
            "router_aux_loss_coef": 0.01, "output_router_logits": False, "use_cache": True}


def hf_tensors(model: TinyMixtral, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The Hugging Face Mixtral names; lm_head is omitted (tied to the embedding)."""
    def c(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).contiguous().clone()

    out = {"model.embed_tokens.weight": c(model.embed_tokens.weight), "model.norm.weight": c(model.norm.weight)}
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = c(blk.input_layernorm.weight)
        out[p + "post_attention_layernorm.weight"] = c(blk.post_attention_layernorm.weight)
        for name in ("q", "k", "v", "o"):
            out[p + f"self_attn.{name}_proj.weight"] = c(getattr(blk.self_attn, f"{name}_proj").weight)
        moe = blk.block_sparse_moe
        out[p + "block_sparse_moe.gate.weight"] = c(moe.gate.weight)
        for e in range(model.s.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out[q + "w1.weight"] = c(moe.w1[e])  # [I, D]
            out[q + "w3.weight"] = c(moe.w3[e])  # [I, D]
            out[q + "w2.weight"] = c(moe.w2[e])  # [D, I]
    return out


def save_checkpoint(model: TinyMixtral, tokenizer: bytes, out: Path) -> None:
    """Write the folder next to its destination and swap it in, so a reader never sees half a checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    save_file(hf_tensors(model, torch.float16), tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(model.s), indent=2) + "\n")
    (tmp / "tokenizer.model").write_bytes(tokenizer)
    keep = out / "TRAINING.md"
    if keep.exists():  # the hand-written training notes survive a retrain
        shutil.copy(keep, tmp / "TRAINING.md")
    tmp.chmod(0o755)  # mkdtemp makes it private; this is a package data folder
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=100_000, help="most optimizer steps (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=25.0,
                   help="minutes for the training loop; 0: no limit, --steps decides (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=TINY.max_context,
                   help="tokens per sequence, the context (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss weight (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=4096,
                   help="sentencepiece vocabulary to train; not with --tokenizer (default: %(default)s)")
    p.add_argument("--dim", type=int, default=TINY.dim, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=TINY.n_layers, help="layers (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=TINY.ffn_dim, help="expert FFN size (default: %(default)s)")
    p.add_argument("--experts", type=int, default=TINY.num_experts, help="experts per layer (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=TINY.top_k, help="experts per token (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path,
                   help="a sentencepiece model to reuse instead of training one (e.g. another demo's)")
    p.add_argument("--log-every", type=int, default=25, help="steps between loss lines (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="steps between held-out checks on 32 windows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    return p.parse_args(argv)


def replay_command(args: argparse.Namespace, steps: int) -> str:
    """The command that repeats this run without a clock: the steps reached, and every option set otherwise."""
    defaults = vars(parse_args([]))
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k not in ("steps", "time_budget") and v != defaults[k]]
    return " ".join(["python tools/train_tiny_moe.py", f"--steps {steps}", "--time-budget 0", *flags])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 1 <= args.top_k <= args.experts:
        sys.exit(f"--top-k must be between 1 and --experts ({args.experts}), not {args.top_k}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    train_files, held_files = split_corpus(corpus_files())
    tokenizer = args.tokenizer.read_bytes() if args.tokenizer else train_tokenizer(list(train_files.values()),
                                                                                   args.vocab)
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train = encode_stream(sp, list(train_files.values()))
    held = encode_stream(sp, list(held_files.values()))
    print(f"corpus: {stdlib_root()}: {len(train_files)} training files ({train.numel():,} tokens), "
          f"{len(held_files)} held-out files ({held.numel():,} tokens); tokenizer {sp.vocab_size()} pieces; "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    print("held out:", " ".join(held_files), flush=True)

    shape = replace(TINY, dim=args.dim, n_layers=args.layers, head_dim=args.dim // TINY.n_heads, ffn_dim=args.ffn,
                    num_experts=args.experts, top_k=args.top_k, vocab_size=sp.vocab_size(), max_context=args.seq_len)
    model = TinyMixtral(shape)
    print(f"model: {shape.to_dict()}; {param_count(model):,} parameters", flush=True)
    T, B = args.seq_len, args.batch
    untrained = evaluate(model, held, T, B)
    print(f"untrained: held-out loss {untrained:.4f}, perplexity {math.exp(untrained):.1f}", flush=True)

    opt = optimizer_for(model, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.time_budget * 60
    total = args.steps
    decay_start = total * 4 // 5
    t0 = time.perf_counter()
    window_t, window_tokens, loss_sum, aux_sum, n_sum = t0, 0, 0.0, 0.0, 0
    step = 0
    while step < total:
        if budget and step < decay_start and time.perf_counter() - t0 >= 0.8 * budget:
            decay_start, total = step, (5 * step + 3) // 4  # so that total * 4 // 5 == step, as with --steps
        lr = learning_rate(step, args.lr, args.warmup, decay_start, total)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = batch_at(train, torch.randint(0, train.numel() - T - 1, (B,), generator=gen), T)
        logits, aux = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # [B*T, V]
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_sum, aux_sum, n_sum, window_tokens = loss_sum + loss.item(), aux_sum + aux.item(), n_sum + 1, \
            window_tokens + B * T
        if step % args.log_every == 0 or step == total:
            now = time.perf_counter()
            print(f"step {step:5d}  lr {lr:.2e}  train loss {loss_sum / n_sum:.4f}  aux {aux_sum / n_sum:.4f}  "
                  f"{window_tokens / (now - window_t):,.0f} tok/s  {(now - t0) / 60:.1f} min", flush=True)
            window_t, window_tokens, loss_sum, aux_sum, n_sum = now, 0, 0.0, 0.0, 0
        if step % args.eval_every == 0:
            print(f"step {step:5d}  held-out loss (32 windows) {evaluate(model, held, T, B, 32):.4f}", flush=True)
    train_min = (time.perf_counter() - t0) / 60

    trained = evaluate(model, held, T, B)
    print(f"trained: {step} steps, {step * B * T:,} tokens, {train_min:.1f} min of training", flush=True)
    print(f"held-out perplexity: trained {math.exp(trained):.2f} (loss {trained:.4f}), "
          f"untrained {math.exp(untrained):.1f} (loss {untrained:.4f})", flush=True)
    for i, shares in enumerate(expert_shares(model, held, T, 8)):
        print(f"layer {i} expert shares (held-out): " + " ".join(f"{s:.3f}" for s in shares), flush=True)
    save_checkpoint(model, tokenizer, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out} ({size / 1e6:.1f} MB); replay: {replay_command(args, step)}; "
          f"total {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine: a checkpoint loaded with resident dense weights, an expert cache and a prefetcher.

    from offload_moe import Engine, EngineOptions
    engine = Engine.load("path/to/model", EngineOptions(cache_experts=4, prefetch=1))
    result = engine.generate("def fib(n):", max_new_tokens=32)
    print(result.text, result.stats["decode_tokens_per_s"])
    for piece in engine.stream("Hello"): print(piece, end="")
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .errors import UserError
from .formats.base import DenseFormat, ExpertFormat
from .formats.int4_layouts import int4_layout_for
from .formats.int8_linear import ATTENTION_SUFFIXES, Int8Linear, int8_attention, int8_attention_state, int8_head
from .formats.registry import expert_format, load_quant, parse_format_name, resolve_group_size
from .formats.sizes import dense_bytes
from .generate import GenerationResult, Sampling, generate_tokens
from .modeling.layers import KVCache, KVPool, rope_tables
from .modeling.transformer import ROUTER_BIAS, Transformer
from .offload.cache import MISS_POLICIES, ExpertCache
from .offload.predictors import RouterPredictor, make_predictor
from .offload.prefetch import Prefetcher
from .offload.store import ExpertStore
from .offload.tiered import TieredStore
from .options import ATTENTION_QUANTS, HEAD_QUANTS
from .planning.trace import Trace, TraceRecorder
from .profiles import (
    DEFAULT_RESERVE,
    MemoryPlan,
    Profile,
    auto_slots,
    check_fits,
    load_profile,
    plan_memory,
    ram_for_experts,
)
from .stats import collect_stats
from .tokenizer import TextStream, Tokenizer, generation_eos_ids, load_tokenizer
from .weights.checkpoint import Checkpoint
from .weights.packed import packed_attention_group
from .weights.sources import open_source

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class EngineOptions:
    """Everything that shapes a run. These defaults are the CLI's defaults."""

    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when there is one)
    dtype: str = "auto"  # float32, float16, bfloat16 or auto (float16 on cuda, float32 on cpu)
    cache_experts: int | list[int] | None = None  # slots per layer (one count, or one per layer); None: all
    prefetch: int = 1  # layers ahead at which each layer's experts are predicted and prefetched; 0 turns it off
    predictor: str = "auto"  # router, a train-predictor file, or auto (the model folder's predictor file, else router)
    prefetch_width: int = 0  # experts prefetched per layer and token (at most its slots); 0: top-k
    policy: str = "lru"  # eviction: lru, lfu, fifo, random
    miss_policy: str = "fetch"  # a decode miss: fetch (copy, wait), cpu (compute on the CPU), auto (faster one)
    expert_quant: str = "none"  # experts quantized at load: none, int8, int4, mxfp4 (a packed folder keeps its own;
    # none keeps an MXFP4 checkpoint's experts MXFP4)
    attention_quant: str = "none"  # attention projections quantized at load: none, int8 (likewise)
    head_quant: str = "none"  # the LM head quantized at load: none, int8 (a packed folder's too)
    group_size: int | None = None  # quantization group size: 32, 64 or 128; None: 64 where it divides every
    # quantized input (the experts' D and I, the attention's D and H*hd, the head's D when int8), else the
    # largest that does
    context: int = 4096  # KV-cache length to preallocate (clipped to the model's own)
    seed: int = 0  # for the random eviction policy
    progress: bool = True  # a progress bar on large loads
    device_budget: int | None = None  # bytes the engine may place on the device (checked at load)
    device_reserve: int = int(DEFAULT_RESERVE)  # kept free on the device for context, activations
    ram_budget: int | None = None  # RAM for the experts (None: 80% of what is available); less than they
    # need makes the store tiered: a RAM cache of this size over the checkpoint on storage
    max_batch: int = 1  # sequences whose KV cache is allocated and planned (serve --max-batch; `Scheduler`)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no CUDA device (use --device cpu)")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise UserError(f"unknown device {self.device!r} (use cpu, cuda or cuda:N)") from None

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r} (use {', '.join(DTYPES)})")
        return DTYPES[self.dtype]


def expert_format_for(ckpt: Checkpoint, options: EngineOptions, dtype: torch.dtype,
                      device: torch.device | None = None) -> ExpertFormat:
    """The experts' packed format: a packed folder's own, else the one asked for (an MXFP4 checkpoint's stay
    MXFP4 unless another quantization is asked for: `quant.load_quant`).

    int4 experts take the code layout of the compute device (`int4_layouts.int4_layout_for`): torch's CUDA
    tiles (`int4-gG-cuda`) where its int4 kernel runs, else the CPU kernel's order (`int4-gG`). A
    packed folder keeps the layout it was written in: when that is not the device's, its experts run
    the dequantizing path, which is correct but slower, and a note on stderr says how to convert."""
    device = device or torch.device("cpu")
    if ckpt.packed_index is None:
        layout = int4_layout_for(device) if options.expert_quant == "int4" else "cpu"
        return expert_format(load_quant(options.expert_quant, ckpt.mxfp4), ckpt.config, dtype,
                             group_size_for(ckpt.config, options), layout)
    name = ckpt.packed_index["format"]
    parsed = parse_format_name(name)
    if parsed is not None:
        quant, group, layout = parsed
        if quant == "int4" and layout != (want := int4_layout_for(device)):
            print(f"note: {ckpt.path} holds int4 experts in the {layout} layout ({name}); on {device} they run the "
                  f"dequantizing path (correct, slower); `convert --layout {want}` writes the layout of this "
                  "device's kernel", file=sys.stderr)
        return expert_format(quant, ckpt.config, dtype, group, layout)
    fmt = DenseFormat(ckpt.config, dtype)
    if fmt.name != name:
        raise UserError(f"{ckpt.path} holds {name} experts; run it with --dtype "
                        f"{ {'fp16': 'float16', 'bf16': 'bfloat16', 'fp32': 'float32'}[name]} (or convert again)")
    return fmt


def attention_group(ckpt: Checkpoint, options: EngineOptions) -> int | None:
    """The group size of int8 attention weights, or None when they stay in the compute dtype: a packed
    folder's own choice, else the one asked for."""
    if ckpt.packed_index is not None:
        return packed_attention_group(ckpt.packed_index)
    if options.attention_quant not in ATTENTION_QUANTS:
        raise UserError(f"unknown attention quantization {options.attention_quant!r} "
                        f"(use {', '.join(ATTENTION_QUANTS)})")
    return None if options.attention_quant == "none" else group_size_for(ckpt.config, options)


def head_group(ckpt: Checkpoint, options: EngineOptions) -> int | None:
    """The group size of an int8 LM head, or None when it stays in the compute dtype. A packed folder's
    experts and attention keep their own group sizes: its head is checked alone."""
    if options.head_quant not in HEAD_QUANTS:
        raise UserError(f"unknown head quantization {options.head_quant!r} (use {', '.join(HEAD_QUANTS)})")
    if options.head_quant == "none":
        return None
    if ckpt.packed_index is not None:
        return resolve_group_size(ckpt.config, options.group_size, experts=False, head=True)
    return group_size_for(ckpt.config, options)


def group_size_for(config, options: EngineOptions) -> int:
    """The quantization group size of a run that quantizes at load: the one asked for, checked against the
    inputs it quantizes, or the automatic one (`quant.resolve_group_size`)."""
    return resolve_group_size(config, options.group_size, experts=options.expert_quant in ("int8", "int4"),
                              attention=options.attention_quant == "int8", head=options.head_quant == "int8")


def set_fields(options: EngineOptions) -> dict:
    """The fields of `options` that differ from EngineOptions' defaults: what a caller set."""
    defaults = EngineOptions()
    return {f.name: getattr(options, f.name) for f in fields(options)
            if getattr(options, f.name) != getattr(defaults, f.name)}


def resolve_options(options: EngineOptions | None, prof: Profile | None, overrides: dict) -> EngineOptions:
    """Each setting from the last of: EngineOptions' defaults, the profile (its settings and budgets),
    the fields of `options` that differ from the defaults, the keyword `overrides`. A field of `options`
    left at its default keeps the profile's value; to force a default over a profile, pass it in
    `overrides`."""
    out = EngineOptions()
    if prof is not None:
        out = replace(out, **prof.settings, device_budget=prof.device_budget, device_reserve=prof.device_reserve,
                      ram_budget=prof.ram_budget)
    if options is not None:
        out = replace(out, **set_fields(options))
    return replace(out, **overrides)


def resolve_slots(cache_experts: int | list[int] | None, n_layers: int, num_experts: int, top_k: int) -> list[int]:
    """Slots per layer from one count or a per-layer list; checked against top-k and the expert count."""
    if cache_experts is None:
        return [num_experts] * n_layers
    slots = [cache_experts] * n_layers if isinstance(cache_experts, int) else list(cache_experts)
    if len(slots) != n_layers:
        raise UserError(f"cache slots: {len(slots)} counts given for {n_layers} layers with experts")
    for layer, n in enumerate(slots):
        if n < top_k:
            raise UserError(
                f"cache slots: layer {layer} has {n} slots, fewer than top-k ({top_k}): a token needs {top_k} "
                "experts resident at once (the card profiles' counts are Mixtral-8x7B's: `python run.py plan "
                "--config MODEL` prints the slots each card leaves for this model; pass them with --cache-experts)"
            )
    return [min(n, num_experts) for n in slots]


class RoutingTap:
    """Feeds a TraceRecorder from inside the model: at each row's entry, the hidden state (when recorded)
    and the predictions made there: the engine's prefetcher's, or with prefetch off a one-row-ahead
    router's of width top-k (`own`: what such a prefetch would fetch); at each router, the experts
    chosen. A prediction for the next token's row is kept for the next forward's first token(s)."""

    def __init__(self, model: Transformer, recorder: TraceRecorder, own: Prefetcher | None):
        self.model, self.recorder, self.own = model, recorder, own
        self.now: dict[int, torch.Tensor] = {}  # row -> [T, P], for this forward
        self.next: dict[int, torch.Tensor] = {}  # row -> [T, P], made for the next forward
        self.carried: dict[int, torch.Tensor] = {}  # the previous forward's `next`

    def enter(self, row: int, h: torch.Tensor, decode: bool) -> None:
        if row == 0:
            self.carried, self.next = self.next, {}
        self.recorder.enter(row, h)
        if self.own is not None:
            self.own(row, h, decode)

    def predicted(self, target: int, next_token: bool, experts: torch.Tensor) -> None:
        (self.next if next_token else self.now)[target] = experts

    def chosen(self, row: int, idx: torch.Tensor, weights: torch.Tensor) -> None:
        pred, carried = self.now.pop(row, None), self.carried.pop(row, None)
        if carried is not None:  # the previous forward's last token(s) predicted this one's first
            T = idx.shape[0]
            pred = carried if carried.shape[0] == T else torch.cat([carried[-1:], carried.new_full(
                (T - 1, carried.shape[1]), -1)])
        self.recorder.add(row, idx, weights, pred)
@dataclass
class Engine:
    checkpoint: Checkpoint
    model: Transformer
    cache: ExpertCache
    kv: KVCache
    tokenizer: Tokenizer | None
    options: EngineOptions
    device: torch.device
    dtype: torch.dtype
    last_result: GenerationResult | None = None
    plan: MemoryPlan | None = None  # what load planned on the device and in RAM (pinned bytes included)
    file_eos_ids: tuple[int, ...] = ()  # EOS ids of generation_config.json and the tokenizer (see `stop_ids`)
    pool: KVPool | None = None  # the KV cache of options.max_batch sequences: `kv` is slot 0, a `Scheduler` uses it

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions | None = None, profile: str | None = None,
             **overrides) -> Engine:
        """Open a checkpoint. Settings: EngineOptions defaults < the profile < the fields `options` sets
        (those that differ from the defaults) < `overrides` (see `resolve_options`)."""
        prof = load_profile(profile) if profile else None
        given = set(overrides) | (set(set_fields(options)) if options is not None else set())
        options = resolve_options(options, prof, overrides)
        device = options.resolved_device()
        dtype = options.resolved_dtype(device)
        ckpt = Checkpoint(path)
        c = ckpt.config
        if options.prefetch < 0:
            raise UserError("--prefetch must be 0 or more")
        if options.prefetch_width < 0:
            raise UserError("--prefetch-width must be 0 (the layer's slots) or more")
        if options.context < 1:
            raise UserError("--context must be positive")
        if options.max_batch < 1:
            raise UserError("--max-batch must be 1 or more")
        context = min(options.context, c.max_context)
        fmt = expert_format_for(ckpt, options, dtype, device)
        attn_group = attention_group(ckpt, options)
        head = head_group(ckpt, options)
        dense = dense_bytes(c, dtype, "none" if attn_group is None else "int8", attn_group or 64)
        if head is not None:  # its int8 bytes in place of its dense ones; off the CPU, the scratch it is rebuilt in
            dense += dense_bytes(c, dtype, head="int8", group_size=head) - dense_bytes(c, dtype)
            dense += c.vocab_size * c.dim * dtype.itemsize if device.type != "cpu" else 0
        if prof is not None and prof.auto and "cache_experts" not in given:
            slots, budget = auto_slots(c, dtype, fmt.nbytes, context, device, options.device_reserve, dense,
                                       options.max_batch)
            options = replace(options, cache_experts=slots, device_budget=budget)
        slots = resolve_slots(options.cache_experts, c.n_moe_layers, c.num_experts, c.top_k)
        pin = device.type == "cuda"  # the host store is pinned (registered exactly: plan.pinned bytes)
        plan = plan_memory(c, dtype, fmt.nbytes, slots, context, options.device_budget, options.device_reserve,
                           options.ram_budget, dense, pin=pin, sequences=options.max_batch)
        check_fits(plan)  # before anything is loaded: with --max-batch, the KV pool too
        in_ram, ram = ram_for_experts(plan)

        with torch.device("meta"):
            model = Transformer(c)
        if attn_group is not None:
            int8_attention(model, attn_group)
        if head is not None:
            int8_head(model, head)
        state = {}
        for name in ckpt.expected_dense():
            t = ckpt.dense(name).to(device)
            if name.endswith(Int8Linear.PARTS):  # a packed folder's int8 attention: stored as the model holds it
                state[name] = t
            elif attn_group is not None and name.endswith(ATTENTION_SUFFIXES):  # quantized here, on the device
                state |= int8_attention_state(name, t, attn_group)
            elif name.endswith(ROUTER_BIAS):  # kept in float32, as transformers: it decides close choices
                state[name] = t.float()
            else:
                state[name] = t.to(dtype)
        if head is not None:  # quantized here, on the device; a tied embedding stays dense beside its int8 copy
            w = state["tok_embeddings.weight"] if c.tie_word_embeddings else state.pop("output.weight")
            state |= int8_attention_state("output.weight", w, head)
        elif c.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        model.rope = rope_tables(c.rotary_dim, c.rope_theta, context, device, c.rope_scaling)
        model.eval()

        if in_ram:
            source = open_source(ckpt, fmt, direct=False, drop_pages=False, pack_device=device if pin else None)
            store = ExpertStore(c, fmt, source, pin=pin, progress=options.progress)
        else:  # the experts do not fit the RAM budget: a RAM cache over the checkpoint on storage
            store = TieredStore(c, fmt, open_source(ckpt, fmt), ram, pin=pin, progress=options.progress)
        if options.miss_policy not in MISS_POLICIES:
            raise UserError(f"unknown miss policy {options.miss_policy!r} (use {', '.join(MISS_POLICIES)})")
        cache = ExpertCache(store, fmt, slots, device, policy=options.policy, seed=options.seed,
                            miss_policy=options.miss_policy)
        if options.miss_policy == "auto":
            cache.calibrate_misses(c.dim, dtype)
        cache.warm()  # layers whose slots hold every expert are resident, not cached
        cache.reset_counters()
        model.cache = cache
        # with every layer's experts resident there is nothing to prefetch: no predictions (a router
        # pass and a host sync per layer, 4-7% of a CPU decode step on the 512-dim bench shape)
        cached = any(n < c.num_experts for n in slots)
        lead = min(options.prefetch, c.n_moe_layers - 1)  # a row predicted from itself would evict its own experts
        if lead and cached:
            predictor = make_predictor(options.predictor, model, ckpt.path, lead, device)
            widths = [min(options.prefetch_width or c.top_k, n) for n in slots]  # a prefetch fills at most the slots
            model.prefetcher = Prefetcher(model, predictor, widths, cache)
        pool = KVPool(c, context, options.max_batch, device, dtype)  # generate's own sequence is its slot 0
        tok = load_tokenizer(ckpt.path)  # tokenizer.json, else tokenizer.model, else None (ids only)
        eos = generation_eos_ids(ckpt.path) + (tok.eos_ids if tok is not None else ())
        return cls(ckpt, model, cache, pool.seqs[0], tok, options, device, dtype, plan=plan, file_eos_ids=eos,
                   pool=pool)

    @property
    def config(self):
        return self.checkpoint.config

    @property
    def stop_ids(self) -> frozenset[int]:
        """Every id that ends generation: config.json's EOS (one id or a list), generation_config.json's
        (Qwen: <|im_end|> and <|endoftext|>) and the tokenizer's eos_token."""
        return frozenset((self.config.eos_id, *self.config.eos_ids, *self.file_eos_ids))

    @property
    def attention_format(self) -> str:
        """How the attention projections are held: int8-gG or the compute dtype."""
        return self._format(self.model.layers[0].attention.wo)  # every attention has wo (latent attention
        # has no wq with q_lora_rank)

    @property
    def head_format(self) -> str:
        """How the LM head is held: int8-gG or the compute dtype."""
        return self._format(self.model.output)

    def _format(self, linear: torch.nn.Module) -> str:
        if isinstance(linear, Int8Linear):
            return f"int8-g{linear.codes.shape[-1]}"
        return str(self.dtype).removeprefix("torch.")

    @property
    def device_bytes(self) -> int:
        """What this engine placed on the compute device: dense weights, expert slots, KV cache (of every sequence)."""
        dense = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        return dense + self.cache.device_bytes + (self.pool.nbytes if self.pool is not None else self.kv.nbytes)

    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        """Prompt ids: token ids as given; a text through the tokenizer (`chat`: as the user's message, in the
        checkpoint's chat template); a list of {"role", "content"} messages, in the chat template."""
        is_messages = isinstance(prompt, list) and any(isinstance(m, dict) for m in prompt)
        if isinstance(prompt, str) or is_messages:
            if self.tokenizer is None:
                raise UserError(f"{self.checkpoint.path} has no tokenizer (tokenizer.json or tokenizer.model): "
                                "pass token ids (--prompt-ids)")
            prompt = self.tokenizer.chat(prompt) if chat or is_messages else self.tokenizer.encode(prompt)
        V = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{V - 1})")
        if not prompt:
            raise UserError("the prompt is empty")
        return list(prompt)

    def generate(
        self,
        prompt: str | list[int] | list[dict],
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        chat: bool = False,
        keep_logits: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Generate from a prompt (text, token ids, or chat messages: see `encode`); `on_text` receives text pieces
        as they are made."""
        pieces = self._run(prompt, max_new_tokens, sampling, chat, keep_logits)
        for piece in pieces:
            if on_text is not None and piece:
                on_text(piece)
        return self.last_result

    def stream(self, prompt: str | list[int] | list[dict], max_new_tokens: int = 64, sampling: Sampling | None = None,
               chat: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are made; `last_result` holds tokens and stats afterwards."""
        return (piece for piece in self._run(prompt, max_new_tokens, sampling, chat, False) if piece)

    def _run(self, prompt, max_new_tokens, sampling, chat, keep_logits) -> Iterator[str]:
        ids = self.encode(prompt, chat)
        text = TextStream(self.tokenizer) if self.tokenizer is not None else None
        steps = generate_tokens(self, ids, max_new_tokens, sampling or Sampling(), keep_logits)
        while True:
            try:
                token = next(steps)
            except StopIteration as done:
                self.last_result = done.value
                break
            yield text.push(token) if text is not None else ""
        if text is not None:
            yield text.flush()  # an incomplete character at the very end, as the full decode shows it
        self.last_result.stats = collect_stats(self, self.last_result)

    def score(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, V] of a whole sequence in one pass (for re-scoring and perplexity)."""
        self.kv.reset()
        if len(ids) > self.kv_capacity:
            raise UserError(f"the sequence has {len(ids)} tokens; the context is {self.kv_capacity}")
        return self.model(torch.tensor(ids, device=self.device), self.kv)

    def start_trace(self, model_name: str = "", hidden: bool = False) -> None:
        """Record the routing of every following forward pass (see `trace.py`) until `stop_trace`; `hidden`:
        the hidden states entering each MoE layer too (float16, D values per token and layer)."""
        c, prefetcher = self.config, self.model.prefetcher
        own = None if prefetcher else Prefetcher(self.model, RouterPredictor(self.model, 1), [c.top_k] * c.n_moe_layers)
        lead, widths = (prefetcher or own).lead, (prefetcher or own).widths
        recorder = TraceRecorder(c.n_moe_layers, c.top_k, c.num_experts, model_name or str(self.checkpoint.path),
                                 metadata={"config": json.dumps(c.to_dict()), "prefetch_lead": str(lead)},
                                 width=max(widths), hidden=hidden)
        self.model.recorder = RoutingTap(self.model, recorder, own)

    def stop_trace(self) -> Trace:
        tap, self.model.recorder = self.model.recorder, None
        return tap.recorder.finish(after=tap.next)

    @property
    def kv_capacity(self) -> int:
        """Tokens a sequence may hold: the context (a sliding window only limits attention)."""
        return self.model.rope[0].shape[0]

"""The engine: a checkpoint loaded with resident dense weights, an expert cache and a prefetcher.

    from offload_moe import Engine, EngineOptions
    engine = Engine.load("path/to/model", EngineOptions(cache_experts=4, prefetch=1))  # or "demo", "org/name"
    result = engine.generate("def fib(n):", max_new_tokens=32, temperature=0.7, seed=1, stop="\n\n")
    print(result.text, result.stats["decode_tokens_per_s"])
    for piece in engine.stream("Hello"): print(piece, end="")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo import find_model
from .errors import UserError
from .formats.int8_linear import Int8Linear
from .generate import GenerationResult, StopText, generate_tokens
from .gguf_tokenizer import gguf_tokenizer
from .memory import MemoryPlan
from .modeling.layers import KVCache, KVPool
from .modeling.transformer import Transformer
from .offload.cache import ExpertCache
from .offload.predictors import make_predictor
from .offload.prefetch import Prefetcher
from .offload.store import ExpertStore
from .offload.tiered import TieredStore
from .options import EngineOptions
from .plan import LoadPlan, merge_options, plan_load, predictor_for, prefetch_widths
from .planning.trace import Trace
from .profiles import load_profile
from .sampling import Sampling, with_params
from .stats import collect_stats
from .threads import set_threads
from .tokenizer import TextStream, Tokenizer, generation_eos_ids, load_tokenizer
from .tracing import start_tap
from .weights.checkpoint import Checkpoint
from .weights.resident import load_resident
from .weights.sources import open_source

__all__ = ["Engine", "EngineOptions"]

log = logging.getLogger(__name__)


def open_cache(ckpt: Checkpoint, plan: LoadPlan) -> ExpertCache:
    """The host store of every expert (in RAM, or tiered over storage) and the device cache over it, warmed:
    layers whose slots hold every expert are resident, not cached."""
    fmt, c, o = plan.expert_format, ckpt.config, plan.options
    if plan.tiered:  # a RAM cache of the budget's size over the checkpoint on storage
        store = TieredStore(c, fmt, open_source(ckpt, fmt), plan.memory.ram, pin=plan.pin, progress=o.progress)
    else:
        source = open_source(ckpt, fmt, direct=False, drop_pages=False,
                             pack_device=plan.device if plan.pin else None)
        store = ExpertStore(c, fmt, source, pin=plan.pin, progress=o.progress)
    cache = ExpertCache(store, fmt, plan.slots, plan.device, policy=o.policy, seed=o.seed, miss_policy=o.miss_policy,
                        pool=plan.pool, link_gbs=o.link_gbs)
    if o.miss_policy == "auto" or plan.lead:  # the copy and CPU times that auto and `speculate` weigh
        cache.calibrate_misses(c.dim, plan.dtype)
    cache.warm()
    cache.reset_counters()
    return cache


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
    name: str = ""  # what the model goes by (serve's model id): a hub id or embedded name as given, else its folder's

    @classmethod
    def load(cls, path: str | Path, options: EngineOptions | None = None, profile: str | None = None,
             revision: str | None = None, **overrides) -> Engine:
        """Open a checkpoint: a folder, a GGUF file, an embedded name ("demo") or a hub id ("org/name", at
        `revision`; "org/name:Q4_K_M", a GGUF file of it), as `demo.find_model` finds them. Settings:
        EngineOptions defaults < the profile < the fields `options` sets (those that differ from the defaults)
        < `overrides` (see `plan.merge_options`); all of them are checked and worked out (`plan.plan_load`)
        before any weight is read (or downloaded)."""
        prof = load_profile(profile) if profile else None
        options, given = merge_options(options, prof, overrides)
        found = find_model(path, revision)
        ckpt = Checkpoint(found.path)
        c = ckpt.config
        log.info("%s: %s layout, %d layers, %d experts, top-%d", ckpt.path, ckpt.layout, c.n_layers, c.num_experts,
                 c.top_k)
        plan = plan_load(ckpt, options, auto=prof is not None and prof.auto and "cache_experts" not in given)
        set_threads(plan.threads)  # before any compute; the C kernels are built here, not mid-stream
        log.info("plan: %s, %s, context %d, experts %s, %d device slots, %s", plan.device,
                 str(plan.dtype).removeprefix("torch."), plan.context, plan.expert_format.name, sum(plan.slots),
                 "a tiered store (RAM over storage)" if plan.tiered else "every expert in RAM")
        log.debug("slots per layer %s; %s", plan.slots, plan.memory)
        start = time.perf_counter()
        model = load_resident(ckpt, plan.device, plan.dtype, plan.context, plan.attention_group, plan.head_group)
        log.info("dense weights loaded in %.1f s", time.perf_counter() - start)
        start = time.perf_counter()
        model.cache = open_cache(ckpt, plan)
        log.info("experts loaded, device cache warmed in %.1f s", time.perf_counter() - start)
        if plan.lead:
            predictor = make_predictor(plan.predictor, model, plan.lead, plan.device)
            model.prefetcher = Prefetcher(model, predictor, plan.widths, model.cache)
        pool = KVPool(c, plan.context, plan.options.max_batch, plan.device, plan.dtype)  # generate's is slot 0
        # a GGUF's from its metadata (the file mapped once), a folder's tokenizer.json, else tokenizer.model, else
        # None (ids only)
        tok = gguf_tokenizer(ckpt.gguf) if ckpt.gguf is not None else load_tokenizer(ckpt.path)
        log.info("tokenizer: %s", type(tok).__name__ if tok is not None else "none (token ids only)")
        eos = generation_eos_ids(ckpt.path) + (tok.eos_ids if tok is not None else ())
        return cls(ckpt, model, model.cache, pool.seqs[0], tok, plan.options, plan.device, plan.dtype,
                   plan=plan.memory, file_eos_ids=eos, pool=pool, name=found.name)

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
        # every attention has wo (latent attention has no wq with q_lora_rank); a layer of one FFN, none
        return self._format(next(blk.attention for blk in self.model.layers if blk.attention is not None).wo)

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

    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False,
               template_args: dict | None = None) -> list[int]:
        """Prompt ids: token ids as given; a text through the tokenizer (`chat`: as the user's message, in the
        checkpoint's chat template); a list of {"role", "content"} messages, in the chat template.
        `template_args`: the chat template's variables ({"enable_thinking": False}), for a chat only."""
        is_messages = isinstance(prompt, list) and any(isinstance(m, dict) for m in prompt)
        if template_args and not (is_messages or (chat and isinstance(prompt, str))):
            raise UserError("chat template arguments apply to a chat (messages, or a text with chat on), not to "
                            "a prompt that goes in as it is")
        if isinstance(prompt, str) or is_messages:
            if self.tokenizer is None:
                has = ("no tokenizer.ggml.model in its metadata" if self.checkpoint.layout == "gguf"
                       else "tokenizer.json or tokenizer.model")
                raise UserError(f"{self.checkpoint.path} has no tokenizer ({has}): pass token ids (--prompt-ids)")
            prompt = (self.tokenizer.chat(prompt, **(template_args or {})) if chat or is_messages
                      else self.tokenizer.encode(prompt))
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
        template_args: dict | None = None,
        stop: str | list[str] | None = None,
        **params,
    ) -> GenerationResult:
        """Generate from a prompt (text, token ids, or chat messages, with `template_args`: see `encode`); `on_text`
        receives text pieces as they are made. `params`: `Sampling`'s fields as keywords (temperature, top_p,
        top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed), over `sampling`'s.
        `stop`: a string or strings that end the text (left out of it; the stop reason is then "stop")."""
        sampling = with_params(sampling, params, "generate")
        for piece in self._run(prompt, max_new_tokens, sampling, chat, keep_logits, template_args, stop):
            if on_text is not None and piece:
                on_text(piece)
        return self.last_result

    def stream(self, prompt: str | list[int] | list[dict], max_new_tokens: int = 64, sampling: Sampling | None = None,
               chat: bool = False, template_args: dict | None = None, stop: str | list[str] | None = None,
               **params) -> Iterator[str]:
        """Yield text pieces as tokens are made; `last_result` holds tokens and stats afterwards. The keywords are
        `generate`'s."""
        sampling = with_params(sampling, params, "stream")
        return (piece for piece in self._run(prompt, max_new_tokens, sampling, chat, False, template_args, stop)
                if piece)

    def _run(self, prompt, max_new_tokens, sampling, chat, keep_logits, template_args, stop) -> Iterator[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
            raise UserError(f"stop must be a string or a list of strings, got {stop!r}")
        ids = self.encode(prompt, chat, template_args)
        if stops and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer: the text is where they are found")
        text = TextStream(self.tokenizer) if self.tokenizer is not None else None
        shown = StopText(stops)
        steps = generate_tokens(self, ids, max_new_tokens, sampling, keep_logits)
        while True:
            try:
                token = steps.send(shown.stopped or None)
            except StopIteration as done:
                self.last_result = done.value
                break
            yield shown.push(text.push(token)) if text is not None else ""
        if text is not None:
            yield shown.push(text.flush(), final=True)  # an incomplete character at the very end, or held-back text
        if shown.stopped:
            self.last_result.text = shown.text
        self.last_result.stats = collect_stats(self, self.last_result)

    def score(self, ids: list[int]) -> torch.Tensor:
        """Logits [T, V] of a whole sequence in one pass (for re-scoring and perplexity)."""
        self.kv.reset()
        if len(ids) > self.kv_capacity:
            raise UserError(f"the sequence has {len(ids)} tokens; the context is {self.kv_capacity}")
        return self.model(torch.tensor(ids, device=self.device), self.kv)

    def start_trace(self, model_name: str = "", hidden: bool = False) -> None:
        """Record the routing of every following forward pass (see `planning/trace.py`) until `stop_trace`; `hidden`:
        the hidden states entering each MoE layer too (float16, D values per token and layer). The predictions
        recorded are the engine's predictor's at any residency (`tracing.start_tap`)."""
        o = self.options
        self.model.recorder = start_tap(self.model, model_name or str(self.checkpoint.path), hidden, o.prefetch,
                                        predictor_for(o.predictor, self.checkpoint.path),
                                        prefetch_widths(o, self.config.top_k, self.cache.slots), self.device)

    def stop_trace(self) -> Trace:
        tap, self.model.recorder = self.model.recorder, None
        return tap.recorder.finish(after=tap.next)

    @property
    def kv_capacity(self) -> int:
        """Tokens a sequence may hold: the context (a sliding window only limits attention)."""
        return self.model.rope[0].shape[0]

"""A small Hugging Face tokenizer for the family checkpoints, trained in the test: a byte-level BPE in Qwen2's
layout (NFC, Qwen's split regex, byte-level pieces), about 300 ids (tests/families.py's VOCAB is 320), with
ChatML's special tokens; and the tokenizer_config.json (special tokens, chat template) and
generation_config.json (a list of EOS ids) that the hub's folders carry beside it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (the families' pad, bos, eos ids)
SIZE = 300
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route every token to a few experts; the others stay on the host.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Why is the sky blue? Sunlight scatters off the air, blue light the most.",
    "Hello, world! Hello again, and hello once more.",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, \u4e2d\u6587, \u65e5\u672c\u8a9e and an emoji \U0001f600.",
    "user assistant system: you are a helpful assistant.",
]

# Qwen2.5's ChatML template, less its tool calls
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role not in ('system', 'user', 'assistant') %}\n"
    "        {{- raise_exception('Conversation roles must be system, user or assistant') }}\n"
    "    {%- elif (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen3.5's and Qwen3.6's ending: the generation prompt opens a <think> block, or with enable_thinking=false (a
# template argument) writes an empty one
QWEN3_5 = CHATML.replace(
    "    {{- '<|im_start|>assistant\\n' }}\n",
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<think>\\n' }}\n"
    "    {%- endif %}\n")
assert QWEN3_5 != CHATML

# Mixtral-Instruct's, with the bos_token and eos_token variables, and whitespace that trim_blocks and lstrip_blocks
# remove (rendered without them, it would be full of newlines and indents)
INST = (
    "{{ bos_token }}{% for message in messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n"
    "    {% if message['role'] == 'user' %}\n"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}\n"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}\n"
    "{% endfor %}\n"
)


def train(post_processor=None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = post_processor or processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def add_tokenizer(path: Path, style: str = "chatml", eos_ids: list[int] | None = None,
                  tokenizer_class: str = "PreTrainedTokenizerFast") -> Path:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into `path`. Styles:
      chatml    Qwen's: no BOS, eos_token <|im_end|>, the ChatML template
      qwen3_5   as chatml, with Qwen3.5's thinking switch (the template argument enable_thinking)
      json_bos  tokenizer.json's own post-processor puts BOS (<|endoftext|>) first, as Llama 3's and Phi's do;
                Mixtral's [INST] template in Jinja, with bos_token and eos_token
      add_bos   the config asks for add_bos_token but tokenizer.json's post-processor adds none: transformers 5
                follows tokenizer.json (no BOS)
    """
    post = None
    if style == "json_bos":
        post = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                             special_tokens=[("<|endoftext|>", 0)])
    tok = train(post)
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIALS}
    cfg = {"tokenizer_class": tokenizer_class, "added_tokens_decoder": added, "model_max_length": 256,
           "clean_up_tokenization_spaces": False, "split_special_tokens": False, "errors": "replace"}
    if style in ("chatml", "qwen3_5"):
        cfg |= {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                "add_prefix_space": False, "chat_template": CHATML if style == "chatml" else QWEN3_5,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    elif style == "json_bos":
        cfg |= {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": INST}
    elif style == "add_bos":
        cfg |= {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True,
                "add_eos_token": False, "chat_template": CHATML}
    else:
        raise ValueError(style)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": 1, "eos_token_id": eos_ids if eos_ids is not None else [2, 0], "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path

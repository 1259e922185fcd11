"""A GGUF file's tokenizer, read as llama.cpp reads it (src/llama-vocab.cpp): the `tokenizer.ggml.*` metadata and
`tokenizer.chat_template` built into a Hugging Face `tokenizers.Tokenizer`, which `tokenizer.HFTokenizer` serves as
it serves a folder's tokenizer.json (encode, chat, decode, streaming).

  gpt2   byte-level BPE: the file's merges, ranked in their order. The text is split by the regexes llama.cpp runs for
         the file's pre-tokenizer (`tokenizer.ggml.pre`, PRE_TOKENIZERS), each one splitting the pieces of the one
         before and keeping both its matches and the text between them; each piece is mapped to the byte-level
         alphabet and merged. No normalizer: llama.cpp applies none (the NFC of a Qwen tokenizer.json is not in the
         file). The Llama-3 pre-tokenizers take a piece that is a token whole (llama.cpp's ignore_merges).
  llama  SentencePiece (SPM), as llama.cpp's own tokenizer: a space before the text and after every special token
         written in it (`add_space_prefix`, on unless the file says not), spaces as U+2581, then adjacent symbols
         merged while any pair makes a token, the best-scored token first. That is a BPE whose merges are every way
         of cutting a token into two tokens, ranked by the made token's score (`_score_merges`); a character with
         no token becomes its UTF-8 bytes' <0xXX> tokens.

Token types: CONTROL and UNKNOWN tokens are special added tokens, USER_DEFINED ones plain added tokens: written in a
text, either is that token (llama.cpp's parse_special, as llama-cli and llama-server tokenize a prompt); decoding
leaves the special ones out. BOS/EOS around a text: `add_bos_token` / `add_eos_token`, else llama.cpp's default (SPM:
BOS; BPE: BOS for the Llama-3 pre-tokenizers). Generation stops on the EOS, EOT and EOM ids and on the tokens
llama.cpp ends generation on by their text (END_OF_GENERATION, which llama.cpp also makes control tokens).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from gguf import Keys, TokenType

from .errors import UserError
from .tokenizer import HFTokenizer
from .weights.gguf import GGUFModel

# llama.cpp's regexes (llm_tokenizer_bpe), as it runs them: the contractions spelled out where the hub's regex has
# (?i:...), and the letter classes of gpt-4o's as llama.cpp approximates them
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTIONS + "?"
         r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTIONS + "?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3 = (r"\p{N}{1,3}",
             "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, hiragana, katakana
             r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_LLM = (
    "[\r\n]",
    # DeepSeek's list of cased letters
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",  # ASCII and full-width punctuation, quotes
    r"\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",  # CJK ideographs, U+0800 to them, Hangul
    r"\p{N}+",
)
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")


class Pre(NamedTuple):
    regexes: tuple[str, ...]
    whole: bool = False  # a piece that is a token is that token (llama.cpp's ignore_merges)
    add_bos: bool = False  # llama.cpp's add_bos where the file has no add_bos_token


# tokenizer.ggml.pre -> how llama.cpp splits the text (the names llama.cpp gives each of these regexes)
PRE_TOKENIZERS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), Pre((LLAMA3,), whole=True, add_bos=True)),
    **dict.fromkeys(("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), Pre((LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open"), Pre((QWEN2,))),
    "qwen35": Pre((QWEN35,)),
    **dict.fromkeys(("gpt-2", "phi-2", "olmo", "mpt", "jais", "trillion", "granite-docling", "exaone4", "gigachat",
                     "a.x-4.0", "mellum", "modern-bert"), Pre((GPT2,))),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), Pre(DEEPSEEK3)),
    "deepseek-llm": Pre(DEEPSEEK_LLM),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), Pre((GPT4O,))),
    "default": Pre(DEFAULT),
}
MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}  # tokenizer.ggml.model -> what it is

# llama.cpp's end-of-generation tokens by their text (with the FIM pad, repo and file-separator tokens it finds by
# their text, which end generation too), less those of models the engine does not run (Gemma's, Kimi's, ...);
# gpt-oss's <|end|> is not one where <|return|> and <|call|> are
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                     "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                     "<｜end▁of▁sentence｜>", "[e~[", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
                     "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>")
# the special tokens of a chat template, by their id's key
SPECIAL_IDS = {"bos_token": Keys.Tokenizer.BOS_ID, "eos_token": Keys.Tokenizer.EOS_ID,
               "unk_token": Keys.Tokenizer.UNK_ID, "sep_token": Keys.Tokenizer.SEP_ID,
               "pad_token": Keys.Tokenizer.PAD_ID, "mask_token": Keys.Tokenizer.MASK_ID}
SPACE = "\u2581"  # SentencePiece's space


def gguf_tokenizer(model: GGUFModel) -> HFTokenizer | None:
    """The file's tokenizer; None where it has none (no tokenizer.ggml.model, or llama.cpp's 'none'): prompts are
    then token ids, as before the file's vocabulary was read."""
    from tokenizers import AddedToken

    kind = model.value(Keys.Tokenizer.MODEL)
    if kind in (None, "none", "no_vocab"):
        return None
    where = model.path.name
    if kind not in MODELS:
        raise UserError(f"{where}: tokenizer.ggml.model {kind!r} is not read (read: "
                        f"{', '.join(f'{k} ({v})' for k, v in MODELS.items())})")
    tokens = _array(model, Keys.Tokenizer.LIST)
    if not tokens:
        raise UserError(f"{where}: tokenizer.ggml.model is {kind!r} but tokenizer.ggml.tokens is missing")
    types = _array(model, Keys.Tokenizer.TOKEN_TYPE, len(tokens)) or [TokenType.NORMAL] * len(tokens)
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp names an empty token
    vocab = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            raise UserError(f"{where}: duplicate token in the vocabulary: {t!r} has ids {vocab[t]} and {i}")

    ids = {name: _id(model, key, len(tokens)) for name, key in SPECIAL_IDS.items()}
    if kind == "llama":  # llama.cpp's ids where an SPM file names none
        ids = {"bos_token": 1, "eos_token": 2, "unk_token": 0} | {k: v for k, v in ids.items() if v is not None}
    if kind == "gpt2":
        pre = _pre(model)
        backend, add_bos = _bpe(model, vocab, pre), pre.add_bos
    else:
        scores = _array(model, Keys.Tokenizer.SCORES, len(tokens)) or [0.0] * len(tokens)
        space = model.value(Keys.Tokenizer.ADD_PREFIX)
        unk = tokens[ids["unk_token"]] if ids["unk_token"] is not None else None
        backend, add_bos = _spm(model, vocab, scores, unk, True if space is None else bool(space)), True
    eog = {t for t in END_OF_GENERATION if t in vocab}
    if {"<|return|>", "<|call|>"} <= eog:
        eog.discard("<|end|>")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=False)
               if ty in (TokenType.CONTROL, TokenType.UNKNOWN) or t in eog]
    backend.add_special_tokens(special)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=False)
                        if ty == TokenType.USER_DEFINED and t not in eog])
    add_bos = _flag(model, Keys.Tokenizer.ADD_BOS, add_bos)
    add_eos = _flag(model, Keys.Tokenizer.ADD_EOS, False)
    backend.post_processor = _around(model, tokens, ids, add_bos, add_eos)

    stop = [ids["eos_token"], _id(model, Keys.Tokenizer.EOT_ID, len(tokens)),
            _id(model, Keys.Tokenizer.EOM_ID, len(tokens)), *(vocab[t] for t in sorted(eog))]
    template = model.value(Keys.Tokenizer.CHAT_TEMPLATE)
    return HFTokenizer(backend, {name: tokens[i] for name, i in ids.items() if i is not None},
                       template if isinstance(template, str) else None, model.path,
                       eos_ids=tuple(dict.fromkeys(i for i in stop if i is not None)))


def _array(model: GGUFModel, key: str, n: int | None = None) -> list:
    """A metadata array ([] without the key); `n`: the vocabulary's size, which it may not fall short of."""
    try:
        value = model.value(key)
    except UnicodeDecodeError:
        raise UserError(f"{model.path.name}: {key} holds text that is not UTF-8") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{model.path.name}: {key} must be an array, got {value!r}")
    if n is not None and len(value) < n:
        raise UserError(f"{model.path.name}: {key} has {len(value)} entries for {n} tokens")
    return value


def _id(model: GGUFModel, key: str, n: int) -> int | None:
    i = model.value(key)
    if i is None:
        return None
    if not isinstance(i, int) or not 0 <= i < n:
        raise UserError(f"{model.path.name}: {key} {i!r} is not a token id (the vocabulary has {n} tokens)")
    return i


def _flag(model: GGUFModel, key: str, default: bool) -> bool:
    value = model.value(key)
    return default if value is None else bool(value)


def _pre(model: GGUFModel) -> Pre:
    """The file's pre-tokenizer; llama.cpp's 'default' where it names none (as llama.cpp does, with its warning)."""
    name = model.value(Keys.Tokenizer.PRE)
    if not name:
        print(f"warning: {model.path.name} names no pre-tokenizer (tokenizer.ggml.pre): llama.cpp's 'default' is "
              "used, as llama.cpp does; the text may not tokenize as the model was trained", file=sys.stderr)
        name = "default"
    if name not in PRE_TOKENIZERS:
        raise UserError(f"{model.path.name}: tokenizer.ggml.pre {name!r} is not a pre-tokenizer offload_moe knows "
                        f"(known: {', '.join(PRE_TOKENIZERS)})")
    return PRE_TOKENIZERS[name]


def _bpe(model: GGUFModel, vocab: dict[str, int], pre: Pre):
    """Byte-level BPE: the file's merges ("a b", cut at the first space after the first character, as llama.cpp
    cuts them), the text split by the pre-tokenizer's regexes in turn, then byte-level mapped."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for m in _array(model, Keys.Tokenizer.MERGES):
        cut = m.find(" ", 1)
        if cut < 0:
            raise UserError(f"{model.path.name}: tokenizer.ggml.merges holds {m!r}, not two tokens and a space")
        merges.append((m[:cut], m[cut + 1:]))
    if not merges:
        raise UserError(f"{model.path.name}: a byte-level BPE vocabulary without tokenizer.ggml.merges")
    backend = Tokenizer(_checked(model, lambda: models.BPE(vocab, merges, ignore_merges=pre.whole)))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm(model: GGUFModel, vocab: dict[str, int], scores: list[float], unk: str | None, space_prefix: bool):
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) as a BPE over ▁-spaced text, with byte fallback
    (`unk`: the token of a byte without its <0xXX> token)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    bpe = _checked(model, lambda: models.BPE(vocab, _score_merges(vocab, scores), unk_token=unk, fuse_unk=True,
                                             byte_fallback=True))
    backend = Tokenizer(bpe)
    spaces = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spaces]) if space_prefix else spaces
    # the text back: ▁ as spaces, <0xXX> pieces as their bytes, and the space the prefix added dropped
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    return backend


def _score_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """llama.cpp merges two adjacent symbols whenever their text is a token, the best-scored token first (the leftmost
    among equals): as BPE merges, every cut of a token into two tokens, ranked by the made token's score (the lower
    id first among equal scores, which is where the two can differ)."""
    ranked = sorted((-scores[i], i, t[:k], t[k:]) for t, i in vocab.items() for k in range(1, len(t))
                    if t[:k] in vocab and t[k:] in vocab)
    return [(a, b) for _, _, a, b in ranked]


def _around(model: GGUFModel, tokens: list[str], ids: dict, add_bos: bool, add_eos: bool):
    """The post-processor that puts BOS before a text and EOS after it, as the file's flags ask."""
    from tokenizers import processors

    around = {}  # "bos_token" / "eos_token" -> (its text, its id), where the flag asks for it
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if flag:
            if ids[name] is None:
                key = name.removesuffix("_token")
                raise UserError(f"{model.path.name}: tokenizer.ggml.add_{key}_token is true, but "
                                f"tokenizer.ggml.{key}_token_id is not set")
            around[name] = (tokens[ids[name]], ids[name])
    single = [around[n][0] for n in ("bos_token",) if n in around] + ["$A"] + [around[n][0] for n in ("eos_token",)
                                                                             if n in around]
    return processors.TemplateProcessing(single=single, special_tokens=list(around.values()))


def _checked(model: GGUFModel, build):
    """tokenizers' own error on a vocabulary it cannot build (a merge of tokens it lacks), as one line."""
    try:
        return build()
    except Exception as e:  # tokenizers raises a bare Exception
        raise UserError(f"{model.path.name}: the vocabulary does not build: {str(e).splitlines()[0]}") from None

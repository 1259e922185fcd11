"""A GGUF file's tokenizer (issue 22): vocabularies written into GGUF files as llama.cpp's converter writes them
(`gguf_files.add_vocab`) tokenize as the tokenizer they came from. Byte-level BPE, one vocabulary trained here per
pre-tokenizer with the hub's own pre-tokenizer for it: ids equal transformers' on the original tokenizer.json (and
transformers' own GGUF reader where it knows the pre-tokenizer) on a varied text set, special and user-defined tokens
in the text included, with and without BOS; decoding gives the text back. SentencePiece: Mixtral's 32000 pieces against
sentencepiece itself. The chat template from the file renders as transformers' apply_chat_template on the folder.
Where llama.cpp differs from the hub's tokenizer (no NFC, gpt-4o's letter classes, add_bos_token) the file's
tokenizer follows llama.cpp. Through the CLI, `generate --json` reports the prompt's ids; bad metadata is one line."""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
from conftest import hf_model, run_cli
from families import make_family, reference
from gguf_files import write_gguf, write_vocab_gguf
from hf_tokenizer import CHATML, CORPUS, INST, QWEN_SPLIT, SPECIALS, add_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from offload_moe.demo import TRAINED_DEMOS
from offload_moe.engine import Engine
from offload_moe.errors import UserError
from offload_moe.gguf_tokenizer import gguf_tokenizer
from offload_moe.options import EngineOptions
from offload_moe.tokenizer import BUNDLED, HFTokenizer, SentencePieceTokenizer
from offload_moe.weights.gguf import GGUFModel


def load_tokenizer(path: Path):
    """A GGUF file's tokenizer, as the engine reads it."""
    return gguf_tokenizer(GGUFModel(Path(path)))

# NFC (the hub's Qwen tokenizer normalizes, llama.cpp does not), no marks nor all-caps non-ASCII words (gpt-4o's)
TEXTS = [
    "Hello, world!",
    "Why is the sky blue? Sunlight scatters off the air, blue light the most.",
    "  leading spaces, trailing spaces   ",
    "lines\n\nand\r\nreturns\n",
    "\ttabs\tand    runs of     spaces \n\t x",
    "digits 1 12 123 1234 1234567 3.14159 and 2025-01-01",
    "contractions: I'm, you're, it's, we'll, they'd, DON'T, I've",
    "Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9, \u00fcber Stra\u00dfe",
    "\u4e2d\u6587 \u65e5\u672c\u8a9e\u306e\u3072\u3089\u304c\u306a\u3068\u30ab\u30bf\u30ab\u30ca \ud55c\uad6d\uc5b4",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "mixed\u4e2d\u6587scripts\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8123\ud55c\uad6d\uc5b4abc",
    "emoji \U0001f600\U0001f680 and a family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # code",
    "punctuation!!! ... ??? --- ((brackets)) {\"json\": [1, 2]} <tag/> a/b/c ~x $5 +1",
    " qqq",  # a token no merge makes: whole under the Llama-3 pre-tokenizer (ignore_merges), bytes elsewhere
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",  # special tokens written in the text
    "<|endoftext|><|endoftext|>a<|im_end|>b",
    "<think>reasoning</think> answer",  # user-defined (not special) tokens
    "",
    " ",
]
MARKED = ["\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e"]  # combining marks: not gpt-4o's
assert all(unicodedata.is_normalized("NFC", t) for t in TEXTS + MARKED)
TRAIN = CORPUS + [  # what the vocabularies learn from (not the texts above)
    "Numbers: 7, 42, 365, 2048, 65536 and 1.5; dates like 1999-12-31.",
    "It's what they'd say: we're sure you'll see I'm right, DON'T you think?",
    "\u65e5\u672c\u8a9e\u3068\u4e2d\u6587\u3068\u3072\u3089\u304c\u306a, \u30ab\u30bf\u30ab\u30ca, \ud55c\uad6d\uc5b4",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b1\u03b9 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u044f\u0437\u044b\u043a, \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "for line in lines:\n\tif line.strip():\n\t\tprint(line)  # tabs\r\n",
    "Stra\u00dfe, \u00fcber, cr\u00e8me, caf\u00e9: {\"key\": [1, 2, 3]} -> ok!!! ???",
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u092e\u0947\u0902 \u0928\u092e\u0938\u094d\u0924\u0947",
]
CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c \U0001f600"}],
]
USER_DEFINED = ["<think>", "</think>"]

# The hub's pre-tokenizers (tokenizer.json), as the oracles: the regexes with (?i:...) and real letter classes
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK3 = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
             r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
             r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-LLM's, with the cased letters it lists as the class they are
DEEPSEEK_LLM = ("[\r\n]", r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
                "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}+")


def splits(*regexes):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> (the hub's pre-tokenizer, its BPE's ignore_merges, a BOS first: Llama 3's post-processor)
PRES = {
    "qwen2": (lambda: splits(QWEN_SPLIT), False, False),
    "qwen35": (lambda: splits(QWEN35), False, False),
    "llama-bpe": (lambda: splits(LLAMA3), True, True),
    "olmo": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False),  # GPT-NeoX's
    "deepseek-v3": (lambda: splits(*DEEPSEEK3), False, False),
    "deepseek-llm": (lambda: splits(*DEEPSEEK_LLM), False, False),
    "gpt-4o": (lambda: splits(O200K), False, False),
}
TRANSFORMERS_READS = ("qwen2", "qwen35", "llama-bpe", "olmo", "gpt-4o")  # those transformers' GGUF reader knows


def bpe_folder(path: Path, pre: str) -> Path:
    """A tokenizer folder for `pre`: add_tokenizer's ChatML config (json_bos, a BOS first, for llama-bpe), its
    tokenizer.json replaced by a byte-level BPE trained on TRAIN with the hub's pre-tokenizer (Qwen's NFC with
    Qwen's), with Ġqqq in the vocabulary but in no merge and USER_DEFINED as added tokens that are not special."""
    path.mkdir()
    pre_tokenizer, ignore_merges, bos = PRES[pre]
    add_tokenizer(path, "json_bos" if bos else "chatml")
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizers.NFC() if pre == "qwen2" else None
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = (processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[(SPECIALS[0], 0)])
                          if bos else processors.ByteLevel(trim_offsets=False))
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    data["model"]["vocab"]["\u0120qqq"] = len(data["model"]["vocab"])
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    tok.save(str(path / "tokenizer.json"))
    return path


def pieces(tok: HFTokenizer, text: str) -> list[str]:
    """How the tokenizer's pre-tokenizer splits a text, each piece as text (not in the byte-level alphabet)."""
    return [decoders.ByteLevel().decode([p]) for p, _ in tok.tk.pre_tokenizer.pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict:
    """pre -> (the folder, its GGUF)."""
    root = tmp_path_factory.mktemp("gguf-tok")
    out = {}
    for pre in PRES:
        folder = bpe_folder(root / pre, pre)
        out[pre] = folder, write_vocab_gguf(folder, root / f"{pre}.gguf", pre)
    return out


@pytest.mark.parametrize("pre", PRES)
def test_bpe_ids_equal_the_tokenizer_it_came_from(bpe, pre):
    folder, path = bpe[pre]
    ours, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, HFTokenizer)
    hub = ref.backend_tokenizer.pre_tokenizer
    for text in TEXTS + (MARKED if pre != "gpt-4o" else []):
        assert pieces(ours, text) == [decoders.ByteLevel().decode([p]) for p, _ in hub.pre_tokenize_str(text)], text
        want = ref(text)["input_ids"]
        assert ours.encode(text) == want, text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), text
        if "<|" not in text:
            assert ours.decode(want) == text
    qqq = ours.encode(" qqq", bos=False)
    assert (qqq == [ours.tk.token_to_id("\u0120qqq")]) == (pre == "llama-bpe")
    assert ours.bos_id == (0 if pre == "llama-bpe" else None) and ours.eos_ids == (2, 0)  # <|im_end|>, <|endoftext|>
    assert ours.vocab_size == ref.vocab_size + len(USER_DEFINED) == len(ref)
    if pre in TRANSFORMERS_READS:  # transformers' own GGUF reader, on the same file (it knows no ignore_merges)
        theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        for text in TEXTS:
            if text != " qqq" or pre != "llama-bpe":
                assert ours.encode(text) == theirs(text)["input_ids"], text


def test_bpe_agreement_over_the_readme(bpe):
    """Every line of README.md (NFC), through every pre-tokenizer: the file's ids equal the tokenizer.json's."""
    lines = [line for line in (Path(__file__).parents[1] / "README.md").read_text().splitlines()
             if unicodedata.is_normalized("NFC", line)]
    assert len(lines) > 500
    for pre, (folder, path) in bpe.items():
        ours, ref = load_tokenizer(path).tk, Tokenizer.from_file(str(folder / "tokenizer.json"))
        got = [e.ids for e in ours.encode_batch(lines)]
        assert got == [e.ids for e in ref.encode_batch(lines)], pre


def test_where_llama_cpp_differs_from_the_hub_the_file_follows_llama_cpp(bpe, tmp_path):
    """llama.cpp applies no normalizer (a Qwen tokenizer.json's NFC is not in the file): a decomposed é stays two
    characters. Its gpt-4o regex approximates the hub's letter classes: a non-ASCII letter counts as upper and lower
    case, a combining mark as no letter. Its add_bos_token is the tokenizer_config.json's, which transformers 5
    ignores beside a tokenizer.json (and its own GGUF reader does not)."""
    folder, path = bpe["qwen2"]
    ours, ref = load_tokenizer(path), Tokenizer.from_file(str(folder / "tokenizer.json"))
    decomposed = "cafe\u0301"
    assert ours.encode(decomposed) != ref.encode(decomposed).ids
    ref.normalizer = None
    assert ours.encode(decomposed) == ref.encode(decomposed).ids
    gpt4o = load_tokenizer(bpe["gpt-4o"][1])
    assert pieces(gpt4o, "\u00c9COLE Caf\u00e9") == ["\u00c9", "COLE", " Caf\u00e9"]  # the hub's: \u00c9COLE whole
    assert pieces(gpt4o, "\u0928\u092e\u0938\u094d\u0924\u0947") == ["\u0928\u092e\u0938", "\u094d\u0924", "\u0947"]
    add_bos = tmp_path / "add_bos"
    add_bos.mkdir()
    add_tokenizer(add_bos, "add_bos")
    file = load_tokenizer(write_vocab_gguf(add_bos, tmp_path / "b.gguf"))
    assert file.encode("hi")[0] == 0 != AutoTokenizer.from_pretrained(add_bos)("hi")["input_ids"][0]
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="b.gguf")
    assert file.encode("hi") == theirs("hi")["input_ids"]


def test_default_pre_tokenizer_and_the_flags(bpe, tmp_path, capsys):
    """'default' (and no tokenizer.ggml.pre, with llama.cpp's warning) splits as llama.cpp's four default regexes;
    the Llama-3 pre-tokenizers add BOS unless the file says not; add_eos_token puts EOS last."""
    folder, _ = bpe["qwen2"]
    default = load_tokenizer(write_vocab_gguf(folder, tmp_path / "d.gguf", "default"))
    assert pieces(default, "Hello, world 12345!") == ["Hello", ",", " world", " ", "123", "45", "!"]
    none = load_tokenizer(write_vocab_gguf(folder, tmp_path / "n.gguf", ""))
    assert "names no pre-tokenizer" in capsys.readouterr().err
    assert none.encode(TEXTS[5]) == default.encode(TEXTS[5])
    bos = {"tokenizer.ggml.bos_token_id": 1}
    llama3 = load_tokenizer(write_vocab_gguf(folder, tmp_path / "l.gguf", "llama-bpe", bos))
    assert llama3.encode("hi")[0] == 1 and llama3.encode("hi", bos=False)[0] != 1
    off = load_tokenizer(write_vocab_gguf(folder, tmp_path / "o.gguf", "llama-bpe",
                                          bos | {"tokenizer.ggml.add_bos_token": False}))
    assert off.encode("hi") == llama3.encode("hi", bos=False)
    eos = load_tokenizer(write_vocab_gguf(folder, tmp_path / "e.gguf", keys={"tokenizer.ggml.add_eos_token": True}))
    hi = load_tokenizer(bpe["qwen2"][1]).encode("hi")
    assert eos.encode("hi") == hi + [2] and eos.encode("hi", bos=False) == hi


@pytest.mark.parametrize("style", ["chatml", "qwen3_5"])
def test_chat_template_from_the_file_equals_apply_chat_template(tmp_path, style):
    add_tokenizer(tmp_path, style)
    ours, ref = load_tokenizer(write_vocab_gguf(tmp_path, tmp_path / "c.gguf")), AutoTokenizer.from_pretrained(tmp_path)
    for args in ({}, {"enable_thinking": False}):
        for messages in CHATS:
            text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **args)
            assert ours.render_chat(messages, **args) == text
            assert ours.chat(messages, **args) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                          **args)["input_ids"]


# -- SentencePiece ----------------------------------------------------------------------------------------


def spm_folder(path: Path, model: Path, **config) -> Path:
    """A sentencepiece folder as Mixtral's: tokenizer.model, tokenizer_config.json (the special tokens, add_bos_token,
    Mixtral-Instruct's template) and config.json (the ids, which gguf-py's SpecialVocab reads there)."""
    path.mkdir()
    shutil.copy(model, path / "tokenizer.model")
    (path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
           "add_eos_token": False, "chat_template": INST}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg | config))
    return path


def sentencepiece_ids(sp, text: str, bos: bool = True) -> list[int]:
    """sentencepiece's ids of a text whose special tokens are those tokens: each stretch between them encoded alone
    (each with its leading space, as llama.cpp adds one after a special token)."""
    ids = [1] if bos else []
    for part in re.split("(<s>|</s>|<unk>)", text):
        ids += [sp.piece_to_id(part)] if part in ("<s>", "</s>", "<unk>") else sp.encode(part) if part else []
    return ids


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-spm")
    return load_tokenizer(write_vocab_gguf(spm_folder(root / "mixtral", BUNDLED), root / "m.gguf"))


def test_sentencepiece_ids_equal_sentencepiece(mixtral):
    """Mixtral's vocabulary: every text and every README.md line, with <s>[INST] written in some."""
    sp = spm.SentencePieceProcessor(model_file=str(BUNDLED))
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    texts = TEXTS + ["<s>[INST] hi [/INST] ok</s>", "\u00c9COLE \u0928\u092e\u0938\u094d\u0924\u0947 cafe\u0301"]
    for text in texts + lines:
        assert mixtral.encode(text) == sentencepiece_ids(sp, text), text
    for text in texts:
        assert mixtral.encode(text, bos=False) == sentencepiece_ids(sp, text, bos=False), text
        ids = mixtral.encode(text)
        assert mixtral.decode(ids) == sp.decode(ids), text
    assert mixtral.decode(mixtral.encode(TEXTS[4])) == TEXTS[4]
    assert (mixtral.bos_id, mixtral.eos_ids, mixtral.special["unk_token"]) == (1, (2,), "<unk>")
    for messages in CHATS[:1] + [[m for m in CHATS[1] if m["role"] != "system"]]:  # [INST] has no system role
        assert mixtral.render_chat(messages).startswith("<s>[INST] ")
        assert mixtral.chat(messages) == SentencePieceTokenizer(BUNDLED).chat(messages)


def test_sentencepiece_flags(tmp_path):
    """The demo model's 4096 pieces, whose sentencepiece adds no space before a text (add_space_prefix false in the
    file): its ids; and llama.cpp's defaults where the file says nothing, with add_bos_token off and add_eos_token
    on: a space before the text, no BOS, EOS last."""
    model = TRAINED_DEMOS["demo"] / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    demo = load_tokenizer(write_vocab_gguf(spm_folder(tmp_path / "demo", model), tmp_path / "demo.gguf"))
    other = load_tokenizer(write_vocab_gguf(spm_folder(tmp_path / "o", model, add_bos_token=False, add_eos_token=True),
                                            tmp_path / "o.gguf", keys={"tokenizer.ggml.add_space_prefix": True}))
    for text in TEXTS[:13]:
        assert demo.encode(text) == sentencepiece_ids(sp, text), text
        assert other.encode(text) == demo.encode(" " + text, bos=False) + [2], text
    assert demo.decode(demo.encode(" x")) == " x" == other.decode(other.encode(" x"))


# -- the engine and the CLI -------------------------------------------------------------------------------


PROMPT = "Why is the sky blue? Caf\u00e9 \U0001f600"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3-MoE's tiny checkpoint with a ChatML tokenizer, and its transformers model."""
    folder = make_family(tmp_path_factory.mktemp("gguf-q3") / "q", "qwen3_moe", tokenizer="chatml")
    return folder, reference(folder, "qwen3_moe")


def test_generate_from_a_gguf_with_its_tokenizer(qwen3, tmp_path, capsys):
    """The checkpoint as an F32 GGUF with its tokenizer: a text prompt and a chat give transformers' ids
    (`prompt_ids`) and the folder's tokens and text; generation stops on both EOS ids."""
    folder, model = qwen3
    path = write_gguf(model, "qwen3_moe", tmp_path / "q.gguf", tokenizer=folder)
    ref = AutoTokenizer.from_pretrained(folder)
    args = ("generate", "--model", str(path), "--max-new-tokens", "6", "--greedy", "--json")
    code, out, err = run_cli(capsys, *args, "--prompt", PROMPT)
    assert code == 0, err
    got = json.loads(out)
    assert got["prompt_ids"] == ref(PROMPT)["input_ids"]
    want = Engine.load(folder, EngineOptions(prefetch=0, progress=False)).generate(PROMPT, 6)
    assert (got["tokens"], got["text"]) == (want.tokens, want.text)
    code, out, err = run_cli(capsys, *args, "--prompt", PROMPT, "--chat")
    assert code == 0, err
    messages = [{"role": "user", "content": PROMPT}]
    assert json.loads(out)["prompt_ids"] == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    engine = Engine.load(path, EngineOptions(prefetch=0, progress=False))
    assert {0, 2} <= engine.stop_ids and engine.tokenizer.chat_template == CHATML
    check_converted(engine, path, tmp_path / "packed", capsys)


def check_converted(engine: Engine, path: Path, out: Path, capsys) -> None:
    """`convert` writes the file's tokenizer into the packed folder, which tokenizes, chats and stops as the file."""
    code, _, err = run_cli(capsys, "convert", "--model", str(path), "--out", str(out), "--experts", "int8")
    assert code == 0, err
    packed = Engine.load(out, EngineOptions(prefetch=0, progress=False))
    assert packed.stop_ids == engine.stop_ids
    for text in TEXTS + [PROMPT]:
        assert packed.tokenizer.encode(text) == engine.tokenizer.encode(text), text
    assert packed.tokenizer.decode(engine.encode(PROMPT)) == engine.tokenizer.decode(engine.encode(PROMPT))
    if engine.tokenizer.chat_template is not None:
        assert packed.encode(PROMPT, chat=True) == engine.encode(PROMPT, chat=True)


def test_generate_from_a_sentencepiece_gguf(tmp_path, capsys):
    """The demo model (Mixtral's architecture, its own sentencepiece) as an F32 GGUF gives the folder's text."""
    demo = TRAINED_DEMOS["demo"]
    folder = spm_folder(tmp_path / "tok", demo / "tokenizer.model")
    path = write_gguf(hf_model(demo), "mixtral", tmp_path / "demo.gguf", tokenizer=folder)
    code, out, err = run_cli(capsys, "generate", "--model", str(path), "--prompt", "def fib(n):", "--greedy",
                             "--max-new-tokens", "8", "--json")
    assert code == 0, err
    want = Engine.load(demo, EngineOptions(prefetch=0, progress=False)).generate("def fib(n):", 8)
    assert (json.loads(out)["prompt_ids"], json.loads(out)["text"]) == (want.prompt_ids, want.text)
    check_converted(Engine.load(path, EngineOptions(prefetch=0, progress=False)), path, tmp_path / "packed", capsys)


def test_refusals_are_one_line(bpe, qwen3, tmp_path, capsys):
    """An unknown pre-tokenizer or tokenizer model: an error line naming it and what is read, exit code 1; bad
    vocabularies are refused by name."""
    folder, model = qwen3
    bad_pre = write_gguf(model, "qwen3_moe", tmp_path / "pre.gguf", tokenizer=folder, pre="qwen9")
    code, out, err = run_cli(capsys, "generate", "--model", str(bad_pre), "--prompt", "hi", "--json")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "tokenizer.ggml.pre 'qwen9' is not a pre-tokenizer offload_moe knows (known: llama3," in err
    data = write_gguf(model, "qwen3_moe", tmp_path / "m.gguf", tokenizer=folder).read_bytes()
    assert data.count(b"gpt2") == 1
    (tmp_path / "bert.gguf").write_bytes(data.replace(b"gpt2", b"bert"))
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "bert.gguf"), "--prompt", "hi")
    assert code == 1 and err.count("\n") == 1
    assert "tokenizer.ggml.model 'bert' is not read (read: gpt2 (byte-level BPE), llama (SentencePiece))" in err

    folder = bpe["qwen2"][0]
    cases = {  # metadata over the converter's -> the error
        "tokenizer.ggml.bos_token_id": (4000, "tokenizer.ggml.bos_token_id 4000 is not a token id"),
        "tokenizer.ggml.add_bos_token": (True, "add_bos_token is true, but tokenizer.ggml.bos_token_id is not set"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            load_tokenizer(write_vocab_gguf(folder, tmp_path / "bad.gguf", keys={key: value}))
    w = gguf.GGUFWriter(tmp_path / "dup.gguf", "qwen3moe")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "a"])
    w.add_token_merges(["a b"])
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(UserError, match="duplicate token in the vocabulary: 'a' has ids 0 and 2"):
        load_tokenizer(tmp_path / "dup.gguf")

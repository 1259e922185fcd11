"""The sentencepiece tokenizer of Mixtral, the instruct template, and incremental decoding."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import UserError

BUNDLED = Path(__file__).parent / "data" / "tokenizer.model"  # Mixtral's, from mistral-common (Apache-2.0)


class Tokenizer:
    def __init__(self, path: str | Path = BUNDLED):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text)

    def chat(self, message: str) -> list[int]:
        """Mixtral-Instruct's template: <s>[INST] message [/INST]"""
        return self.encode(f"[INST] {message.strip()} [/INST]")

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TextStream:
    """Turns a growing list of token ids into new text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

"""Each token's own bytes, for the log-probabilities' `token` and `bytes` (OpenAI's): a choice's tokens' bytes join
into its text, whatever the tokenizer."""

from __future__ import annotations


def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenText:
    """A token's own bytes, and them as text: a sentencepiece piece with its ▁ as a space and a <0xNN> byte as that
    byte; a tokenizer.json token through its decoder's mapping (byte-level characters back to bytes; a metaspace's ▁
    as a space, byte fallback's <0xNN>); an added or special token as written; any other tokenizer's token
    decoded alone."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}
        self.kind, self.added = "decode", {}
        if hasattr(tokenizer, "sp"):
            self.kind = "sentencepiece"
        elif hasattr(tokenizer, "tk"):
            self.added = {i: t.content for i, t in tokenizer.tk.get_added_tokens_decoder().items()}
            decoder = tokenizer.tk.decoder
            state = decoder.__getstate__().decode() if decoder is not None else ""
            if '"ByteLevel"' in state:
                self.kind, self.chars = "byte_level", _byte_level()
            elif "\u2581" in state:
                self.kind, self.fallback = "metaspace", '"ByteFallback"' in state

    def __call__(self, token: int) -> tuple[str, list[int]]:
        got = self.cache.get(token)
        if got is None:
            raw = self._bytes(token)
            got = self.cache[token] = (raw.decode("utf-8", "backslashreplace"), list(raw))
        return got

    def _bytes(self, token: int) -> bytes:
        if self.kind == "sentencepiece":
            sp, piece = self.tok.sp, self.tok.sp.id_to_piece(token)
            if sp.is_byte(token):
                return bytes([int(piece[3:5], 16)])
            return piece.encode() if sp.is_control(token) or sp.is_unknown(token) else piece.replace("▁", " ").encode()
        if token in self.added:
            return self.added[token].encode()
        if self.kind == "byte_level":
            return bytes(self.chars[c] for c in self.tok.tk.id_to_token(token))
        if self.kind == "metaspace":
            piece = self.tok.tk.id_to_token(token)
            if self.fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("▁", " ").encode()
        return self.tok.decode([token]).encode()

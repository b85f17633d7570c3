"""A byte-level tokenizer: no vocabulary files, no downloads, any text round-trips.

Ids 0-255 are the UTF-8 bytes; 256 is BOS and 257 is EOS, so a model needs ``vocab_size >= 258``.
Ids the model can emit beyond 257 decode to nothing (an untrained model may produce them).
"""

from __future__ import annotations

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    BOS = 256
    EOS = 257
    vocab_size = 258

    def encode(self, text: str, bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return ([self.BOS] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

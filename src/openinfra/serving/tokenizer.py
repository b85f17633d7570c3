"""A byte-level tokenizer with the data stage's ids: no vocabulary files, no downloads.

Ids 0-255 are the UTF-8 bytes and 256 ends a document (EOS) — the same ids as
``openinfra.smallpond.corpus.ByteTokenizer`` writes into the training shards, so a model trained on
them is served with this. A model needs ``vocab_size >= 257``; ids it emits past 256 decode to
nothing (an untrained model may produce them).
"""

from __future__ import annotations

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    EOS = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

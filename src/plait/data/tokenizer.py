"""Byte-level tokenizer: every UTF-8 byte is a token, so any text round-trips and vocab is 256."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, tokens) -> str:
        data = bytes(int(t) for t in tokens if 0 <= int(t) < 256)
        return data.decode("utf-8", errors="replace")

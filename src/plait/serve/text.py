"""Tokenizers as the engine sees them, and turning a stream of token ids into final text.

A token may end inside a UTF-8 character (plait's byte tokenizer, GPT-2's byte-level BPE), and
text that might be the start of a stop string cannot be sent yet: :class:`TextStream` releases
text only once it is final, so streamed deltas always add up to the non-streamed completion.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import Protocol, Sequence

from plait.data.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decoder(self) -> "IncrementalDecoder": ...


class IncrementalDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Bytes:
    """plait's byte-level tokenizer (every UTF-8 byte is a token, vocabulary 256)."""

    eos_token_id: int | None = None

    def __init__(self) -> None:
        self._tok = ByteTokenizer()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    def decoder(self) -> "_ByteDecoder":
        return _ByteDecoder()


class _ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id])) if 0 <= token_id < 256 else ""

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face tokenizer saved in a model folder (loaded from local files only)."""

    def __init__(self, path: str | Path, vocab_size: int):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos = self._tok.eos_token_id
        # A tokenizer may define an end token the model cannot produce; it then never ends a request.
        self.eos_token_id = eos if isinstance(eos, int) and 0 <= eos < vocab_size else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def decoder(self) -> "_DiffDecoder":
        return _DiffDecoder(self)


class _DiffDecoder:
    """Decodes everything so far and releases the new suffix once it ends in a whole character."""

    def __init__(self, tok: HFTokenizer):
        self._tok, self._ids, self._sent = tok, [], 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its rest
            return ""
        out, self._sent = text[self._sent:], len(text)
        return out

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        out, self._sent = text[self._sent:], len(text)
        return out


def has_hf_tokenizer(folder: str | Path) -> bool:
    f = Path(folder)
    return (f / "tokenizer.json").is_file() or ((f / "vocab.json").is_file() and (f / "merges.txt").is_file())


class TextStream:
    """Token ids in, final text out: whole characters only, and never text a stop string may yet claim.

    `push` returns (text now final, stopped); once a stop string appears, the text before it is
    released and the stream is over.
    """

    def __init__(self, decoder: IncrementalDecoder, stop: Sequence[str] = ()):
        self._decoder = decoder
        self._stop = tuple(stop)
        self._pending = ""
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._release(self._decoder.push(token_id))

    def flush(self) -> str:
        """Everything held back, at the end of generation (no stop string matched)."""
        if self.stopped:
            return ""
        text, _ = self._release(self._decoder.flush(), final=True)
        return text

    def _release(self, text: str, final: bool = False) -> tuple[str, bool]:
        self._pending += text
        if not self._stop:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out, True
        if final:
            out, self._pending = self._pending, ""
            return out, False
        # Hold back the longest tail that is a proper prefix of some stop string.
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

"""Frozen layers with cached activations: the frozen prefix runs once per sample.

With the first k blocks frozen (:mod:`plait.parallel.memory.freeze`), the prefix of the model (the
embeddings and blocks[0:k]) is a fixed function of each sample's tokens, so its output can be
computed once and read back on every later pass over the same sample (the next epochs, the
held-out batches of every evaluation). :func:`cache_frozen_prefix` makes it so:

- Entries are keyed by the sample's content (a BLAKE2b digest of its token row), so the data
  path needs no sample ids, and two identical rows share an entry. A row's prefix output depends
  only on that row (attention is causal within the row; nothing mixes rows), so an entry computed
  in one batch is exactly the value recomputing it in another batch would give.
- Values are kept in the dtype the blocks produced (fp32, or bf16 under autocast): the next
  block reads back the very tensor it would have received, so losses equal recomputation's.
- The token embedding is tied to the output head; while the head trains, the prefix's input
  would drift and no cached value would stay right. Caching therefore freezes the token
  embedding (and so the head) as well: what trains is blocks[k:] and the final norm.
- In memory up to a limit, then spilled to an append-only file (:class:`ActivationCache`).

A miss runs the original frozen blocks under `torch.no_grad` (they need no graph: backward stops
at their output anyway) on the whole batch, so kernels see the batch shape they would without
the cache. A hit skips them entirely. The blocks' `forward` is replaced on the instance, as
recomputation does: module names, state dicts and checkpoints are unchanged.

Each process keeps its own cache; under data parallelism a rank meets samples that other ranks
computed in earlier epochs (the sampler reshuffles), so it computes and caches those too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.parallel.blocks import require_blocks

log = logging.getLogger(__name__)

_ORIGINAL = "_plait_forward_before_activation_cache"


@dataclass(frozen=True)
class _OnDisk:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _cleanup(handle: Any, folder: str | None) -> None:
    if handle is not None:
        handle.close()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class ActivationCache:
    """Tensors by key: in memory up to `limit_mb`, then appended to a file under `spill_dir`.

    Entries are never evicted or changed (a frozen prefix's outputs do not change); past the
    memory limit new ones go to disk. The spill file lives in a fresh temporary folder (under
    `spill_dir`, or the system's temporary folder) that :meth:`close`, or the cache's garbage
    collection, removes.
    """

    def __init__(self, limit_mb: float = 1024.0, spill_dir: str | Path | None = None):
        if not limit_mb >= 0:
            raise ConfigError(f"train.freeze_cache_mb={limit_mb} must be ≥ 0 (0 = every entry on disk)")
        self.limit_bytes = int(limit_mb * 2**20)
        self.spill_dir = Path(spill_dir) if spill_dir else None
        self._memory: dict[bytes, torch.Tensor] = {}
        self._disk: dict[bytes, _OnDisk] = {}
        self.memory_bytes = 0
        self.disk_bytes = 0
        self.hits = 0
        self.misses = 0
        self._file = None
        self._folder: str | None = None
        self._finalizer: weakref.finalize | None = None

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def __contains__(self, key: bytes) -> bool:
        return key in self._memory or key in self._disk

    def get(self, key: bytes) -> torch.Tensor | None:
        """The tensor stored under `key` (on the CPU), or None."""
        value = self._memory.get(key)
        if value is not None:
            return value
        where = self._disk.get(key)
        if where is None:
            return None
        nbytes = _nbytes(where.shape, where.dtype)
        self._file.seek(where.offset)
        raw = bytearray(self._file.read(nbytes))
        return torch.frombuffer(raw, dtype=torch.uint8).view(where.dtype).view(where.shape)

    def put(self, key: bytes, value: torch.Tensor) -> None:
        """Store a copy of `value` under `key` (kept if the key is already there)."""
        if key in self:
            return
        value = value.detach().to("cpu", copy=True).contiguous()
        nbytes = value.numel() * value.element_size()
        if self.memory_bytes + nbytes <= self.limit_bytes:
            self._memory[key] = value
            self.memory_bytes += nbytes
            return
        handle = self._spill_file()
        handle.seek(0, os.SEEK_END)
        offset = handle.tell()
        handle.write(value.view(-1).view(torch.uint8).numpy().tobytes())
        self._disk[key] = _OnDisk(offset, tuple(value.shape), value.dtype)
        self.disk_bytes += nbytes

    def _spill_file(self):
        if self._file is None:
            if self.spill_dir is not None:
                try:
                    self.spill_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ConfigError(f"train.freeze_cache_dir={str(self.spill_dir)!r} cannot be "
                                      f"created ({exc}); give a writable folder") from None
            self._folder = tempfile.mkdtemp(prefix="plait-activations-",
                                            dir=str(self.spill_dir) if self.spill_dir else None)
            self._file = open(os.path.join(self._folder, "entries.bin"), "w+b")
            self._finalizer = weakref.finalize(self, _cleanup, self._file, self._folder)
            log.info("activation cache past its %.0f MB in memory: spilling to %s",
                     self.limit_bytes / 2**20, self._folder)
        return self._file

    @property
    def spill_path(self) -> Path | None:
        """The folder entries spill to, once the first one has."""
        return Path(self._folder) if self._folder else None

    def stats(self) -> dict[str, int]:
        """Entries, bytes in memory and on disk, and row hits and misses so far."""
        return {"entries": len(self), "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes,
                "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        """Drop every entry and remove the spill folder."""
        self._memory.clear()
        self._disk.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._finalizer is not None:
            self._finalizer()
        self._file = self._folder = self._finalizer = None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def row_keys(idx: torch.Tensor) -> list[bytes]:
    """One content key per row of a (B, T) token tensor: its length and tokens, digested."""
    rows = idx.detach().to("cpu", torch.int64).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


class FrozenPrefix:
    """What :func:`cache_frozen_prefix` installs: the keys of the batch in flight, the cache and
    the frozen blocks' own forwards. `cache` None recomputes every pass (the reference)."""

    def __init__(self, model: nn.Module, k: int, cache: ActivationCache | None):
        self.model = model
        self.k = k
        self.cache = cache
        self.blocks = list(require_blocks(model, "train.freeze_cache"))[:k]
        self.forwards: list[Callable] = [b.forward for b in self.blocks]
        self._keys: list[bytes] | None = None
        self._handle = model.register_forward_pre_hook(self._remember_tokens, with_kwargs=True)

    def _remember_tokens(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        idx = args[0] if args else kwargs.get("idx")
        self._keys = row_keys(idx) if isinstance(idx, torch.Tensor) and idx.dim() == 2 else None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for forward in self.forwards:
                x = forward(x)
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The output of blocks[k-1] for the batch in flight, whose blocks[0] input is `x`."""
        keys, cache = self._keys, self.cache
        self._keys = None  # used once: a block called on its own recomputes
        if cache is None or keys is None or len(keys) != x.size(0):
            return self._run(x)
        found = [cache.get(key) for key in keys]
        if all(v is not None for v in found):
            cache.hits += len(keys)
            return torch.stack(found).to(x.device)
        out = self._run(x)  # the whole batch: the same kernel shapes as without the cache
        for key, value, row in zip(keys, found, out):
            if value is None:
                cache.misses += 1
                cache.put(key, row)
            else:
                cache.hits += 1
        return out

    def remove(self) -> None:
        """Put the blocks' forwards back and stop watching the model's input."""
        self._handle.remove()
        for block in self.blocks:
            if hasattr(block, _ORIGINAL):
                del block.forward
                delattr(block, _ORIGINAL)
        if self.cache is not None:
            self.cache.close()


def _passthrough(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def check_deterministic(model: nn.Module, k: int) -> None:
    """Refuse a prefix with active dropout: its outputs would differ on every pass."""
    blocks = require_blocks(model, "train.freeze_cache")
    inside = {id(m) for b in blocks for m in b.modules()}
    prefix = [m for b in blocks[:k] for m in b.modules()]
    prefix += [m for m in model.modules() if id(m) not in inside]  # the embedding's dropout
    for m in prefix:
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise ConfigError(f"train.freeze_cache needs model.dropout = 0 (a dropout of p={m.p} "
                              "acts in the frozen prefix, whose outputs would differ on every pass)")


def cache_frozen_prefix(model: nn.Module, k: int, cache: ActivationCache | None) -> FrozenPrefix:
    """Serve the output of `model.blocks[0:k]` from `cache`, computing each sample's once.

    Call after :func:`~plait.parallel.memory.freeze.freeze_blocks` with the same k and before
    `parallelize`: it also freezes the embeddings (the token embedding is tied to the head), so
    they are neither reduced nor sharded. `cache` None keeps the same frozen model but recomputes
    the prefix on every pass. The model's forward must take the token ids (B, T) first.
    """
    blocks = require_blocks(model, "train.freeze_cache")
    if not 1 <= k <= len(blocks):
        raise ConfigError(f"train.freeze_cache needs train.freeze_blocks in [1, {len(blocks)}] "
                          f"(the model's blocks), got {k}")
    if any(hasattr(b, _ORIGINAL) for b in blocks):
        raise ConfigError("the frozen prefix of this model is already cached")
    check_deterministic(model, k)
    if any(p.requires_grad for b in blocks[:k] for p in b.parameters()):
        raise ConfigError(f"cache_frozen_prefix: blocks[0:{k}] must be frozen first "
                          f"(freeze_blocks(model, {k}))")
    inside = {id(m) for b in blocks for m in b.modules()}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m) not in inside:
            m.weight.requires_grad_(False)  # the head tied to it stops training with it
    prefix = FrozenPrefix(model, k, cache)
    for i, block in enumerate(prefix.blocks):
        setattr(block, _ORIGINAL, block.forward)
        block.forward = prefix.output if i == k - 1 else _passthrough
    return prefix

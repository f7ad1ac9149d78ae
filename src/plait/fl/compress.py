"""Compressed client updates: top-k or PowerSGD with error feedback, on plait's compression math.

A client sends the change of its parameters in the round (its update Δ = w_local − w_global),
compressed, instead of w_local. What the compression missed is kept on the client (in its
Flower `Context.state`, which persists across rounds on a SuperNode and in both local runtimes)
and added to the next round's update (error feedback), as plait's gradient hooks do
(plait.parallel.data_parallel.compression supplies the math).

- "topk": the ⌈ratio·n⌉ largest-magnitude entries of the whole flattened update, sent as one byte
  array of their values (float16 by default, `fl.topk_values`) followed by their indices in the
  narrowest unsigned width that addresses the model (uint16 up to 65,536 parameters, else
  uint32): 4 bytes an entry instead of 8, so twice the entries for the same upload. The value
  rounding is kept on the client with the rest of what was not sent (error feedback).
- "powersgd": every matrix whose rank-r factors are smaller than itself is sent as P̂ (n×r) and
  Q (m×r) with Δ ≈ P̂Qᵀ (Q warm-starts the next round); vectors are sent whole. One float32 array.

The reply carries the payload in the ArrayRecord "arrays" and a ConfigRecord that names the
scheme; :func:`decode_update` rebuilds full parameters (reference + Δ̂) on the server, and refuses
(raises :class:`UpdateDecodeError`) a payload that does not fit the server's parameters.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from plait.errors import ConfigError, PlaitError
from plait.fl.records import ARRAYS, numpy_arrays
from plait.parallel.data_parallel.compression import low_rank_pays, powersgd_factors, topk_indices

log = logging.getLogger(__name__)

SCHEME = "plait-compression"  # the ConfigRecord naming the scheme of a compressed reply
ERROR_FEEDBACK = "plait-error-feedback"  # Context.state: what earlier rounds' compression missed
WARM_Q = "plait-powersgd-q"  # Context.state: PowerSGD's Qs
KINDS = ("topk", "powersgd")
VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def index_dtype(total: int) -> type:
    """The narrowest unsigned integer that holds every index of `total` parameters."""
    return np.uint16 if total <= 2 ** 16 else np.uint32


class UpdateDecodeError(PlaitError, ValueError):
    """A compressed update does not fit the server's parameters."""


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], int(np.prod(shape[1:]))


def _powersgd_matrix(shape: tuple[int, ...], rank: int) -> bool:
    if len(shape) < 2:
        return False
    n, m = _matrix(shape)
    return low_rank_pays(n, m, rank)


def _initial_q(m: int, rank: int, seed: int) -> torch.Tensor:
    return torch.randn(m, rank, generator=torch.Generator().manual_seed(seed + m))


class CompressionMod:
    """A Flower client mod: replace a train reply's parameters by its compressed update."""

    def __init__(self, kind: str, ratio: float = 0.01, rank: int = 1, seed: int = 0, values: str = "float16"):
        if kind not in KINDS:
            raise ConfigError(f"fl.compression={kind!r} is invalid here; valid: {', '.join(KINDS)}")
        if values not in VALUE_DTYPES:
            raise ConfigError(f"fl.topk_values={values!r} is invalid; valid: {', '.join(VALUE_DTYPES)}")
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"fl.topk_ratio={ratio} must be in (0, 1]")
        if rank < 1:
            raise ConfigError(f"fl.powersgd_rank={rank} must be ≥ 1")
        self.kind, self.ratio, self.rank, self.seed, self.values = kind, ratio, rank, seed, values

    def __call__(self, msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or ARRAYS not in msg.content.array_records:
            return call_next(msg, ctxt)
        sent = numpy_arrays(msg.content.array_records[ARRAYS])
        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        local = numpy_arrays(reply.content.array_records[ARRAYS])
        delta = {k: torch.from_numpy(local[k].astype(np.float32) - sent[k].astype(np.float32))
                 for k in sent}
        if ERROR_FEEDBACK in ctxt.state.array_records:
            for k, e in numpy_arrays(ctxt.state.array_records[ERROR_FEEDBACK]).items():
                if k in delta and e.shape == tuple(delta[k].shape):
                    delta[k] += torch.from_numpy(e)
        payload, residual = (self._topk(delta) if self.kind == "topk" else self._powersgd(delta, ctxt))
        ctxt.state[ERROR_FEEDBACK] = ArrayRecord({k: Array(v.numpy()) for k, v in residual.items()})
        reply.content[ARRAYS] = ArrayRecord({"update": Array(payload)})
        scheme = {"kind": self.kind, "rank": self.rank}
        if self.kind == "topk":
            scheme["values"] = self.values
        reply.content[SCHEME] = ConfigRecord(scheme)
        return reply

    def _topk(self, delta: dict[str, torch.Tensor]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        flat = torch.cat([d.reshape(-1) for d in delta.values()])
        idx = topk_indices(flat, self.ratio)
        values = flat[idx].numpy()
        if self.values == "float16":  # out-of-range magnitudes are sent at the limit, the rest kept
            values = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
        sent = values.astype(VALUE_DTYPES[self.values])
        rest = flat.clone()
        rest[idx] -= torch.from_numpy(sent.astype(np.float32))
        residual, at = {}, 0
        for k, d in delta.items():
            residual[k] = rest[at:at + d.numel()].view_as(d)
            at += d.numel()
        indices = idx.numpy().astype(index_dtype(flat.numel()))
        payload = np.concatenate([sent.view(np.uint8), indices.view(np.uint8)])
        return payload, residual

    def _powersgd(self, delta: dict[str, torch.Tensor], ctxt: Context) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        qs = numpy_arrays(ctxt.state.array_records[WARM_Q]) if WARM_Q in ctxt.state.array_records else {}
        parts, residual, new_q = [], {}, {}
        for k, d in delta.items():
            if not _powersgd_matrix(tuple(d.shape), self.rank):
                parts.append(d.reshape(-1))
                residual[k] = torch.zeros_like(d)
                continue
            m = d.reshape(_matrix(tuple(d.shape)))
            q = (torch.from_numpy(qs[k]) if k in qs and qs[k].shape == (m.shape[1], self.rank)
                 else _initial_q(m.shape[1], self.rank, self.seed))
            p_hat, q_next = powersgd_factors(m, q)
            residual[k] = (m - p_hat @ q_next.t()).view_as(d)
            new_q[k] = q_next
            parts += [p_hat.reshape(-1), q_next.reshape(-1)]
        ctxt.state[WARM_Q] = ArrayRecord({k: Array(v.contiguous().numpy()) for k, v in new_q.items()})
        return torch.cat(parts).numpy().astype(np.float32), residual


def is_compressed(content: RecordDict) -> bool:
    return SCHEME in content.config_records


def decode_update(content: RecordDict, reference: ArrayRecord) -> ArrayRecord:
    """Full parameters (reference + decoded update) from a compressed reply's content."""
    scheme = content.config_records[SCHEME]
    kind, rank = scheme.get("kind"), scheme.get("rank")
    arrays = content.array_records.get(ARRAYS)
    if arrays is None or list(arrays.keys()) != ["update"]:
        raise UpdateDecodeError("a compressed update must hold exactly one array named 'update'")
    payload = arrays["update"].numpy()
    ref = numpy_arrays(reference)
    shapes = {k: v.shape for k, v in ref.items()}
    total = sum(int(np.prod(s)) for s in shapes.values())
    if kind == "topk":
        value_name = scheme.get("values", "float16")
        if value_name not in VALUE_DTYPES:
            raise UpdateDecodeError(f"top-k values {value_name!r} unknown; valid: {', '.join(VALUE_DTYPES)}")
        value_t, index_t = np.dtype(VALUE_DTYPES[value_name]), np.dtype(index_dtype(total))
        entry = value_t.itemsize + index_t.itemsize
        if payload.dtype != np.uint8 or payload.size % entry:
            raise UpdateDecodeError(f"a top-k payload of {value_name} values and {index_t.name} indices is "
                                    f"uint8 × a multiple of {entry} ({entry} bytes an entry), got "
                                    f"{payload.dtype} × {payload.size}")
        k = payload.size // entry
        values = payload[:value_t.itemsize * k].view(value_t).astype(np.float32)
        idx = payload[value_t.itemsize * k:].view(index_t).astype(np.int64)
        if not np.isfinite(values).all():
            raise UpdateDecodeError("top-k values must be finite")
        if k == 0 or k > total or idx.max() >= total or len(np.unique(idx)) != k:
            raise UpdateDecodeError(f"top-k indices must be {k} distinct positions in [0, {total})")
        flat = np.zeros(total, dtype=np.float32)
        flat[idx] = values
    elif kind == "powersgd":
        if not isinstance(rank, int) or rank < 1:
            raise UpdateDecodeError(f"a PowerSGD update needs a rank ≥ 1, got {rank!r}")
        sizes = []
        for s in shapes.values():
            n, m = _matrix(s) if len(s) >= 2 else (0, 0)
            sizes.append((n + m) * rank if _powersgd_matrix(s, rank) else int(np.prod(s)))
        if payload.dtype != np.float32 or payload.size != sum(sizes):
            raise UpdateDecodeError(f"a rank-{rank} PowerSGD payload of these parameters is float32 × "
                                    f"{sum(sizes)}, got {payload.dtype} × {payload.size}")
        pieces, at = [], 0
        for s, size in zip(shapes.values(), sizes):
            chunk = payload[at:at + size]
            at += size
            if _powersgd_matrix(s, rank):
                n, m = _matrix(s)
                p_hat, q = chunk[:n * rank].reshape(n, rank), chunk[n * rank:].reshape(m, rank)
                pieces.append((p_hat @ q.T).reshape(-1))
            else:
                pieces.append(chunk)
        flat = np.concatenate(pieces)
    else:
        raise UpdateDecodeError(f"unknown compression {kind!r}; valid: {', '.join(KINDS)}")
    out, at = {}, 0
    for k, v in ref.items():
        size = v.size
        out[k] = Array((v + flat[at:at + size].reshape(v.shape)).astype(v.dtype))
        at += size
    return ArrayRecord(out)

"""The gradient noise scale from what data parallelism already computes, and adaptive batch size.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A): with the
squared norm of a gradient averaged over a small batch, |G_small|², and over a big one, |G_big|²,

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)     (true gradient)
    tr Σ  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)                (per-sample noise)
    B_noise = tr Σ / |G|²

are unbiased estimates of the two numerator terms. Under data parallelism each rank's local
gradient is a small batch (micro_batch_size × grad_accum) and the all-reduced one the big batch
(× dp): the local norm is read in the reducer's communication hook, just before the all-reduce,
and the averaged norm is the one clipping computes anyway. Both terms are smoothed (EMA) before
the ratio is taken, as the paper advises.

Adaptive batch size (Pollux/AdaptDL, McCandlish's critical batch): a batch well below B_noise
makes nearly full use of each sample, so while B_noise ≥ 2 × the global batch, doubling the batch
(by doubling accumulation) gives ≥ 1.5× the progress per step. The learning rate follows with
AdaScale's gain (Johnson et al. 2020), r = (σ² + |G|²) / (σ²/S + |G|²) for a batch S times the
starting one (σ² = tr Σ / B_0), or the square-root rule √S.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def noise_terms(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from the squared gradient norms at batch sizes b_small < b_big."""
    if not b_big > b_small > 0:
        raise ValueError(f"the noise scale needs 0 < b_small < b_big, got {b_small} and {b_big}")
    g2 = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


@dataclass
class NoiseScale:
    """Smoothed |G|² and tr Σ, and their ratio B_noise (the "simple" noise scale)."""

    ema: float = 0.95
    g2: float | None = None
    trace: float | None = None
    updates: int = 0

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> None:
        g2, trace = noise_terms(g_small_sq, g_big_sq, b_small, b_big)
        if self.g2 is None:
            self.g2, self.trace = g2, trace
        else:
            # Bias-free start: the first value seeds the average, later ones are weighted in.
            self.g2 = self.ema * self.g2 + (1 - self.ema) * g2
            self.trace = self.ema * self.trace + (1 - self.ema) * trace
        self.updates += 1

    @property
    def value(self) -> float | None:
        """B_noise = tr Σ / |G|², or None before an estimate or while |G|² is not positive."""
        if self.g2 is None or self.g2 <= 0:
            return None
        return self.trace / self.g2

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self.g2, "trace": self.trace, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g2, self.trace, self.updates = state["g2"], state["trace"], int(state["updates"])


def adascale_gain(trace: float, g2: float, base_batch: int, batch: int) -> float:
    """AdaScale's lr gain for `batch` samples against `base_batch`: (σ² + μ²) / (σ²/S + μ²)."""
    scale = batch / base_batch
    sigma2 = max(0.0, trace) / base_batch
    mu2 = max(g2, 1e-30)
    return (sigma2 + mu2) / (sigma2 / scale + mu2)


class _LocalNormTap:
    """Wraps a reducer's communication hook: adds up the squared local gradients of each bucket
    before it is reduced (this rank's small-batch gradient)."""

    def __init__(self, inner):
        self.inner = inner
        self.sq = 0.0
        self._parts: list[torch.Tensor] = []

    def __call__(self, bucket, group):
        self._parts.append(bucket.grads.detach().float().pow(2).sum())
        return self.inner(bucket, group)

    def take(self) -> torch.Tensor:
        total = torch.stack(self._parts).sum() if self._parts else torch.zeros(())
        self._parts = []
        return total

    # The trainer's checkpoint asks a hook for compression state: answer as the inner one does.
    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class BatchMonitor:
    """The noise scale of a data-parallel run, and (optionally) its adaptive batch size.

    Attach with :meth:`attach` after `parallelize`; call :meth:`after_backward` with the averaged
    gradient's norm each step (every rank: one scalar all-reduce over dp).
    """

    def __init__(self, reducer, dp_group, dp: int, micro_batch: int, grad_accum: int,
                 ema: float = 0.95, adaptive: bool = False, max_global_batch: int = 0,
                 interval: int = 10, lr_rule: str = "adascale"):
        self.tap = _LocalNormTap(reducer.comm_hook)
        reducer.comm_hook = self.tap
        self.dp_group, self.dp, self.micro_batch = dp_group, dp, micro_batch
        self.grad_accum = grad_accum
        self.base_accum = grad_accum
        self.noise = NoiseScale(ema=ema)
        self.adaptive, self.interval, self.lr_rule = adaptive, interval, lr_rule
        base = micro_batch * grad_accum * dp
        self.max_global_batch = max_global_batch or 8 * base

    @classmethod
    def attach(cls, model, mesh, cfg) -> BatchMonitor | None:
        """A monitor for `model` when cfg.elastic.noise_scale is on and the layout allows it
        (plain data parallelism, dp ≥ 2: the local gradient exists whole on each rank)."""
        e, p = cfg.elastic, cfg.parallel
        if not e.noise_scale:
            return None
        reducer = getattr(model, "reducer", None)
        if mesh.dp_size < 2 or reducer is None or p.pp > 1 or p.tp > 1 or p.zero:
            log.warning("elastic.noise_scale needs plain data parallelism with dp ≥ 2 (got %s, zero=%d); "
                        "the noise scale is not measured", mesh.shape, p.zero)
            return None
        t = cfg.train
        return cls(reducer, mesh.dp_group, mesh.dp_size, t.micro_batch_size, t.grad_accum, e.noise_ema,
                   e.adaptive_batch, e.max_global_batch, e.adapt_interval, e.lr_rule)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def base_global_batch(self) -> int:
        return self.micro_batch * self.base_accum * self.dp

    def after_backward(self, global_norm: float) -> dict[str, float]:
        """Fold this step's norms in; returns the metrics to log."""
        local = self.tap.take()
        dist.all_reduce(local, group=self.dp_group)
        g_small_sq = local.item() / self.dp
        b_small = self.micro_batch * self.grad_accum
        self.noise.update(g_small_sq, float(global_norm) ** 2, b_small, b_small * self.dp)
        out = {"grad_sq_small": g_small_sq, "global_batch": self.global_batch}
        if self.noise.value is not None:
            out["noise_scale"] = self.noise.value
        if self.adaptive:
            out["lr_factor"] = self.lr_factor()
        return out

    def lr_factor(self) -> float:
        """The learning-rate multiplier for the current batch against the starting one."""
        if self.grad_accum == self.base_accum:
            return 1.0
        if self.lr_rule == "sqrt" or self.noise.g2 is None:
            return math.sqrt(self.global_batch / self.base_global_batch)
        return adascale_gain(self.noise.trace, self.noise.g2, self.base_global_batch, self.global_batch)

    def next_grad_accum(self, step: int) -> int | None:
        """Every `interval` steps: double accumulation while B_noise ≥ 2 × the global batch and the
        doubled batch fits max_global_batch; returns the new value, or None to keep it."""
        if not self.adaptive or step % self.interval or self.noise.updates < self.interval:
            return None
        b = self.noise.value
        if b is None or b < 2 * self.global_batch or 2 * self.global_batch > self.max_global_batch:
            return None
        self.grad_accum *= 2
        log.info("adaptive batch: noise scale %.1f ≥ 2 × %d: global batch -> %d (lr × %.3f)", b,
                 self.global_batch // 2, self.global_batch, self.lr_factor())
        return self.grad_accum

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.state_dict(), "grad_accum": self.grad_accum,
                "base_accum": self.base_accum, "dp": self.dp}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the estimate and, at the same dp, the adapted accumulation."""
        self.noise.load_state_dict(state["noise"])
        if self.adaptive and state.get("dp") == self.dp and state.get("base_accum") == self.base_accum:
            self.grad_accum = int(state["grad_accum"])

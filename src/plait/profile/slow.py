"""A testing knob: make this rank's model `factor` times slower, as if its device were slower.

For tests and benchmarks of straggler detection and uneven-hardware balancing only
(`[profile] slow_rank`, `slow_factor`, `slow_phase`). Forward: each layer of the model (the
submodules its pipeline layer list names, else its children) stalls after its forward for
(factor − 1) × the time that forward took. Backward: each backward pass (a whole model's, or one
pipeline action's) stalls at its end for (factor − 1) × its duration, measured from the moment
the gradient reaches the first hooked layer output (an identity autograd function marks it) to the
end of the pass (an autograd engine callback), so the engine's own overhead is stretched too. The
slowdown follows the work: a layer moved to another stage, or a smaller batch, costs
proportionally less extra time.

The stall sleeps rather than spins: a slower device keeps its own rank busy without taking time
from the others, while ranks sharing one machine's cores (as in tests) would slow each other down
if the slow one spun. Each sleep overshoots by its wake-up latency, a fixed cost that would not
shrink with the work, so stalls shorter than MIN_STALL_S are pooled and an overshoot is
deducted from the next stall: the total extra time stays (factor − 1) × the time measured.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from plait.errors import ConfigError

PHASES = ("forward", "backward", "compute")
MIN_STALL_S = 0.002


def stall(seconds: float) -> None:
    """Hold this rank for `seconds` (at least), leaving the CPU to the other processes."""
    if seconds > 0:
        time.sleep(seconds)


class _BackwardStarts(torch.autograd.Function):
    """Identity; its backward tells the slow-down that a backward pass reached this layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slow: "SlowDown") -> torch.Tensor:
        ctx.slow = slow
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.slow._backward_started()
        return grad, None


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's compute units: the submodules its pipeline layer list names, else its children."""
    spec = getattr(model, "pipeline_spec", None)
    if callable(spec):
        paths = [path for layer in spec().layers for path in layer.paths]
        return [model.get_submodule(p) for p in paths]
    return list(model.children()) or [model]


class SlowDown:
    """Hooks making `model`'s layers `factor` times slower in `phase`; `remove()` undoes them."""

    def __init__(self, model: nn.Module, factor: float, phase: str = "compute"):
        if factor < 1.0:
            raise ConfigError(f"profile.slow_factor={factor} must be ≥ 1")
        if phase not in PHASES:
            raise ConfigError(f"profile.slow_phase={phase!r} is invalid; valid: {', '.join(PHASES)}")
        self.extra = factor - 1.0
        self.forward = phase in ("forward", "compute")
        self.backward = phase in ("backward", "compute")
        self._backward_t0: float | None = None  # start of the backward pass in progress
        self._debt = 0.0  # extra seconds owed (negative: an overshoot to deduct)
        self.requested = {"forward": 0.0, "backward": 0.0}  # extra seconds asked for, in total
        self._handles = []
        for layer in _layers(model):
            starts: list[float] = []  # a stack: a layer may be re-entered
            self._handles.append(layer.register_forward_pre_hook(self._pre(starts)))
            self._handles.append(layer.register_forward_hook(self._post(starts), always_call=True))

    def _pre(self, starts: list[float]):
        def hook(module: nn.Module, args: tuple) -> None:
            starts.append(time.perf_counter())
        return hook

    def _post(self, starts: list[float]):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            t0 = starts.pop()
            if self.forward:
                self._pay(self.extra * (time.perf_counter() - t0), "forward")
            if self.backward and isinstance(out, torch.Tensor) and out.requires_grad:
                return _BackwardStarts.apply(out, self)
            return None
        return hook

    def _backward_started(self) -> None:
        if self._backward_t0 is None:  # the pass's first hooked layer: stall when the pass ends
            self._backward_t0 = time.perf_counter()
            torch.autograd.Variable._execution_engine.queue_callback(self._stall)

    def _stall(self) -> None:
        t0, self._backward_t0 = self._backward_t0, None
        self._pay(self.extra * (time.perf_counter() - t0), "backward")

    def _pay(self, seconds: float, phase: str) -> None:
        self.requested[phase] += seconds
        self._debt += seconds
        if self._debt >= MIN_STALL_S:
            t0 = time.perf_counter()
            stall(self._debt)
            self._debt -= time.perf_counter() - t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

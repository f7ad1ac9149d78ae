"""How a parameter-server job trains: consistency mode, the servers' optimizer, liveness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from plait.config import PS_MODES, PS_OPTIMIZERS, Config
from plait.errors import ConfigError


@dataclass(frozen=True)
class PSOptions:
    """Everything servers and workers must agree on.

    `lr_schedule(global_step)` sets the learning rate (constant `lr` when None). The global step
    is the server's version in sync mode and version // workers in async/ssp, where every worker's
    gradient is its own update. `grad_clip` > 0 clips by global L2 norm: the averaged gradient in
    sync mode (as one process would), each pushed gradient in async/ssp.
    """

    mode: str = "sync"
    staleness: int = 2
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    worker_timeout_s: float = 60.0
    lr_schedule: Callable[[int], float] | None = None

    def __post_init__(self) -> None:
        if self.mode not in PS_MODES:
            raise ConfigError(f"parallel.ps.mode={self.mode!r} is invalid; valid: {', '.join(PS_MODES)}")
        if self.optimizer not in PS_OPTIMIZERS:
            raise ConfigError(f"parallel.ps.optimizer={self.optimizer!r} is invalid; "
                              f"valid: {', '.join(PS_OPTIMIZERS)}")
        if self.staleness < 0:
            raise ConfigError(f"parallel.ps.staleness={self.staleness} must be ≥ 0")
        if self.worker_timeout_s <= 0:
            raise ConfigError(f"parallel.ps.worker_timeout_s={self.worker_timeout_s} must be > 0")

    @classmethod
    def from_config(cls, cfg: Config) -> "PSOptions":
        from plait.optim import lr_at

        t, ps = cfg.train, cfg.parallel.ps
        return cls(mode=ps.mode, staleness=ps.staleness, optimizer=ps.optimizer, lr=t.lr,
                       momentum=ps.momentum, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                       grad_clip=t.grad_clip, worker_timeout_s=ps.worker_timeout_s,
                       lr_schedule=lambda step: lr_at(step, t))

    def lr_at(self, global_step: int) -> float:
        return self.lr if self.lr_schedule is None else self.lr_schedule(global_step)


def build_shard_optimizer(pieces: list[tuple[nn.Parameter, bool]], opts: PSOptions) -> torch.optim.Optimizer:
    """The server's optimizer over its pieces; `True` marks pieces of ≥2-D weights, which alone
    get weight decay (as plait's all-reduce trainer does)."""
    decay = [p for p, d in pieces if d]
    plain = [p for p, d in pieces if not d]
    groups = [g for g in ({"params": decay, "weight_decay": opts.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    if opts.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum)

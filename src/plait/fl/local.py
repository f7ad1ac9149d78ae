"""A client's local training (FedAvg / FedSGD / FedProx) and the held-out evaluation.

This is a small loop rather than plait's Trainer: the Trainer runs one long job over a
torch.distributed process group, with checkpoints and a schedule across its steps, while a
client's round is a few SGD steps on its own handful of samples, repeated thousands of times in
one process (the in-process runner) or once per message on a SuperNode. It uses the same model,
the same optimizer parameter groups (weight decay on matrices only, plait.optim) and the same
datasets as the Trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from plait.config import Config
from plait.optim import optimizer_groups


@dataclass
class LocalWork:
    """How much a client trains per round and how."""

    epochs: int = 1
    steps: int = 0  # > 0: this many mini-batches instead of `epochs` passes
    batch_size: int = 10  # 0 = the whole local set in one batch (FedSGD)
    lr: float = 0.05
    momentum: float = 0.0
    proximal_mu: float = 0.0  # FedProx: mu/2 · ||w − w_global||² added to the loss

    @classmethod
    def from_config(cls, cfg: Config, proximal_mu: float = 0.0, server_round: int = 1) -> "LocalWork":
        """The work of a client in `server_round` (1-based), its lr decayed by fl.lr_decay."""
        f = cfg.fl
        lr = f.lr * f.lr_decay ** max(server_round - 1, 0)
        return cls(f.local_epochs, f.local_steps, f.batch_size, lr, f.momentum, proximal_mu)

    def batch_for(self, n: int) -> int:
        return n if self.batch_size == 0 else min(self.batch_size, n)

    def planned_steps(self, n: int) -> int:
        """Mini-batches a full round takes on `n` local items."""
        return self.steps or self.epochs * math.ceil(n / self.batch_for(n))


@dataclass
class LocalResult:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples: int  # local training set size (FedAvg's weight)


def train_locally(model: nn.Module, data, work: LocalWork, cfg: Config, *, seed: int,
                  max_steps: int | None = None,
                  targets: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LocalResult:
    """Train `model` in place on `data` for one round; returns the mean loss and steps taken.

    `seed` fixes the batch order (so every runtime gives the same result); `max_steps` cuts the
    round short (a straggler's partial work); `targets` rewrites labels (the label-flip attack).
    """
    n = len(data)
    bs = work.batch_for(n)
    planned = work.planned_steps(n)
    steps = planned if max_steps is None else max(1, min(planned, max_steps))
    groups = optimizer_groups(model, cfg.train)
    opt = torch.optim.SGD(groups, lr=work.lr, momentum=work.momentum)
    anchor = ([p.detach().clone() for p in model.parameters()] if work.proximal_mu > 0 else None)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    order = torch.randperm(n, generator=gen)
    at, total = 0, 0.0
    for _ in range(steps):
        if at >= n:  # a new pass over the local data (the last batch of a pass may be short)
            order, at = torch.randperm(n, generator=gen), 0
        x, y = data.batch(order[at:at + bs].tolist())
        at += bs
        if targets is not None:
            y = targets(y)
        _, loss = model(x, y)
        objective = loss
        if anchor is not None:
            prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
            objective = loss + 0.5 * work.proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        total += loss.item()
    return LocalResult(total / steps, steps, n)


@torch.no_grad()
def evaluate(model: nn.Module, val, cfg: Config) -> dict[str, float]:
    """Held-out loss (and accuracy, for the digits) of `model`."""
    model.eval()
    try:
        if cfg.data.dataset == "digits":
            x, y = val.batch(range(len(val)))
            logits, loss = model(x, y)
            return {"loss": loss.item(), "accuracy": (logits.argmax(-1) == y).float().mean().item()}
        n, b = len(val), cfg.train.micro_batch_size
        losses = [model(*val.batch([(i * b + j) % n for j in range(b)]))[1].item()
                  for i in range(cfg.train.eval_batches)]
        return {"loss": sum(losses) / len(losses)}
    finally:
        model.train()

"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine schedule."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from plait.config import TrainConfig


def optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups in checkpoint order: ≥2-D weights (matmuls, embeddings) decay, the rest not.

    Sharded optimizers (ZeRO) use the same grouping, so their gathered state has the same
    parameter indices as this optimizer's and checkpoints move between layouts.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay applies to ≥2-D weights (matmuls, embeddings), not to biases and norms."""
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def lr_scale(cfg: TrainConfig, global_batch: int) -> float:
    """The factor `train.lr_scaling` puts on lr and min_lr at `global_batch` samples per step.

    "linear": global / reference_batch, Goyal et al. 2017's rule for SGD (keep warm-up on: the
    scaled lr is too large for the first steps); "sqrt": its square root, which keeps Adam-family
    updates' noise scale; "none": 1.
    """
    if cfg.lr_scaling == "none":
        return 1.0
    ratio = global_batch / cfg.reference_batch
    return ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)


def scaled_schedule(cfg: TrainConfig, global_batch: int) -> TrainConfig:
    """`cfg` with lr and min_lr scaled for `global_batch` (see :func:`lr_scale`), for :func:`lr_at`."""
    scale = lr_scale(cfg, global_batch)
    if scale == 1.0:
        return cfg
    return dataclasses.replace(cfg, lr=cfg.lr * scale, min_lr=cfg.min_lr * scale)

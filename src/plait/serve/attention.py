"""Attention over cache slots, written out so its arithmetic is known: matmul, softmax, matmul."""

from __future__ import annotations

import torch


def attend(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q · kt · scale + bias) · v for q (B, H, T, D), kt (B, H, D, S), v (B, H, S, D) and an
    additive bias broadcastable to (B, H, T, S): 0 where a position may be seen, -inf elsewhere."""
    s = torch.matmul(q, kt).mul_(scale).add_(bias)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def span(position: int, quantum: int, length: int) -> int:
    """Positions [0, span) to attend over from `position`: rounded up to a multiple of `quantum`."""
    return min(length, -(-(position + 1) // quantum) * quantum)

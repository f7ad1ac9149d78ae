"""Parallel strategies, one file each."""
from plait.parallel.data import GradientReducer

__all__ = ["GradientReducer"]

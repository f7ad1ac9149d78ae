"""Test support shipped with plait: a persistent pool of Gloo worker processes."""
from plait.testing.pool import WorkerPool, WorkerError

__all__ = ["WorkerPool", "WorkerError"]

"""Elastic training: membership changes, in-memory snapshots, preemption and migration,
multiplexing and adaptive batch size."""

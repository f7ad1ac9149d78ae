"""Spending compute to save memory: activation recomputation and frozen layers.

- recompute.py  full or selective recomputation of each block's activations in backward
- freeze.py     the first k blocks frozen (no gradients, no optimizer state)
"""

"""ZeRO stages 1-3 (Rajbhandari et al., 2020) over the data-parallel group.

- flat.py    flat per-block parameter buffers split evenly over dp (FlatUnit)
- grads.py   stage 2+: gradients reduce-scattered per block during backward
- params.py  stage 3: parameters gathered before use and released after
- optim.py   AdamW over this rank's shard, optionally on the CPU (offload)
- model.py   ZeroModel, what `parallelize` returns for parallel.zero ≥ 1
"""

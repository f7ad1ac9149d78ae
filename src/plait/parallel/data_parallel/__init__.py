"""Data parallelism: our own gradient reducer and the hooks that change what it sends.

- reducer.py       bucketed, overlapped all-reduce (and a naive mode), used-flags, no_sync
- hooks.py         shared pieces of comm hooks: byte accounting, deferred completion
- compression.py   bf16/fp16 casts, PowerSGD and top-k with error feedback
- hierarchical.py  all-reduce within nodes, then across them
- build.py         the hook a [parallel] config asks for
"""

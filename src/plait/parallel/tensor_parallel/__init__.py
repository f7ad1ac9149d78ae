"""Megatron-LM tensor parallelism, applied to a built plain model by a plan of module names.

- ops.py     autograd communication ops (copy/reduce, gather/scatter, sequence-parallel pairs)
- layers.py  column-, row- and vocab-parallel layers, vocab-parallel cross-entropy
- shard.py   how a parameter is sharded (ShardSpec) and partial-gradient marks
- plan.py    styles, plans (name patterns -> styles), resolving and applying them
- split.py   the split of a model and what tp adds to training: dropout stream, partial
             gradients, checkpoint gather/slice; shared by tp, tp × ZeRO and tp × pp
"""

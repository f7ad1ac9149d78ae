"""Parallel strategies, one package each, composed by :func:`parallelize` in one place.

- data_parallel/     the bucketed, overlapped gradient reducer and its comm hooks (casts,
                     PowerSGD, top-k, hierarchical all-reduce)
- tensor_parallel/   Megatron-LM layer split: comm ops, column/row/vocab layers, plans, the split
- pipeline/          partition, schedules, point-to-point transfers, runtime, the stage model
- zero/              ZeRO-1/2/3: flat units, sharded gradients, parameters and optimizer, offload
- parameter_server/  servers, workers, protocol, sharding, launcher and the run loop
- memory/            activation recomputation and frozen layers
- base.py            ParallelModel, what the trainer talks to
- grad_norm.py       one global gradient-norm clip driven by how gradients are sharded
"""

from plait.parallel.base import ParallelModel, unwrap
from plait.parallel.parallelize import parallelize

__all__ = ["ParallelModel", "parallelize", "unwrap"]

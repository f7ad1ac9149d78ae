"""Pipeline parallelism: a balanced layer partitioner, batched point-to-point transfers, and the
naive, GPipe, 1F1B and interleaved 1F1B schedules with bubble accounting.

- layers.py     the model as an ordered layer list (PipelineSpec), stage modules by plain names
- partition.py  balanced contiguous split by params / FLOPs / measured time
- schedules.py  per-rank action lists, their rules, theoretical bubbles, a checking simulator
- p2p.py        batched isend/irecv over the mesh's pp group
- runtime.py    runs one rank's actions; stashes, loss, timing
- state.py      layout-independent checkpoint state
- model.py      PipelineParallelModel, what `plait.parallel.parallelize` returns for pp > 1
"""

from plait.parallel.pipeline.layers import PipeLayer, PipelineSpec, pipeline_spec
from plait.parallel.pipeline.model import PipelineParallelModel
from plait.parallel.pipeline.partition import COSTS, Partition, balance, make_partition
from plait.parallel.pipeline.schedules import (SCHEDULES, Action, build_schedule, bubble_vs_ideal,
                                               check_schedule, replay, simulate,
                                               theoretical_bubble)

__all__ = ["COSTS", "SCHEDULES", "Action", "Partition", "PipeLayer", "PipelineParallelModel",
           "PipelineSpec", "balance", "bubble_vs_ideal", "build_schedule", 
           "check_schedule", "make_partition", "pipeline_spec", "replay", "simulate", "theoretical_bubble"]


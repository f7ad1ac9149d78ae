"""Planning: choose a layout for a model and a cluster from an analytic cost model.

- shapes.py     GPT shapes, named (gpt-125m … gpt-1t) or from a config; parameter and FLOP counts
- hardware.py   the hardware table: GPUs, links, clusters; "this CPU" from calibrate.py
- calibrate.py  microbenchmarks of this CPU (matmul, attention, elementwise, AdamW, Gloo α/β and its
                waits between compute), cached
- layout.py     Mesh-TensorFlow named-dimension layouts, checked and compiled into plait's strategies
- cut.py        the pipeline layer cut, as plain data
- ops.py        the kernels and collectives of one micro-batch
- timing.py     roofline op times and α–β collective times
- memory.py     memory per device (ZeRO stages, activations with and without recomputation)
- software.py   what the software does (plait; Megatron-LM as Narayanan et al. 2021 ran it)
- cost.py       one layout's step time, throughput and memory
- search.py     every layout plait can run, costed and ranked
- check.py      a finished run's measured step time against its prediction
- emit.py, render.py, command.py   `plait plan`'s config writer, tables and options

Nothing here imports torch except calibrate.py and check.py, inside their functions.
"""

from plait.plan.cost import Candidate, Estimate, estimate
from plait.plan.hardware import (
           GPUS,
           LINKS,
           Cluster,
           Device,
           Link,
           cpu_cluster,
           gpu_cluster,
)
from plait.plan.layout import CompiledLayout, compile_layout
from plait.plan.search import search
from plait.plan.shapes import MODELS, ModelShape, named_model, shape_from_config

__all__ = ["GPUS", "LINKS", "MODELS", "Candidate", "Cluster", "CompiledLayout", "Device", "Estimate",
           "Link", "ModelShape", "compile_layout", "cpu_cluster", "estimate", "gpu_cluster", "named_model",
           "search", "shape_from_config"]

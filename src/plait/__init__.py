"""plait: distributed training of PyTorch models on an explicit dp × pp × tp mesh."""

from plait.config import Config, load_config
from plait.errors import PlaitError
from plait.mesh import ParallelMesh
from plait.parallelize import ParallelModel, parallelize

__version__ = "0.1.0"
__all__ = ["Config", "ParallelMesh", "ParallelModel", "PlaitError", "load_config", "parallelize"]

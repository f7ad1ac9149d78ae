"""Parameter-server training, one small file per job: see :mod:`plait.parallel.parameter_server`."""

from plait.parallel.ps.layout import PSLayout
from plait.parallel.ps.options import PSOptions
from plait.parallel.ps.server import ParameterServer, ServerStats
from plait.parallel.ps.sharding import FlatLayout
from plait.parallel.ps.worker import PSWorker, StepReport, WorkerEvicted

__all__ = ["FlatLayout", "PSLayout", "PSOptions", "PSWorker", "ParameterServer", "ServerStats",
           "StepReport", "WorkerEvicted"]

"""Parameter-server training: workers push gradients to servers that own the parameters.

One launch makes S server processes (ranks 0 … S−1) and N−S workers, all talking over
torch.distributed point-to-point messages (Gloo). The flat parameter vector is split across the
servers in ranges balanced by size; each server runs the optimizer (AdamW or SGD with momentum)
for its range. Three consistency modes:

* ``sync``: a server waits for every worker's gradient, averages, updates and sends the new
  parameters to all: the same arithmetic as all-reduce data parallelism.
* ``async``: a server applies each gradient as it arrives; workers never wait for each other,
  at the price of stale gradients (computed on parameters others have since changed).
* ``ssp``: async, but a worker may run at most ``staleness`` steps ahead of the slowest live one.

In async and ssp a worker that dies is declared dead (connection lost, or silent longer than
``worker_timeout_s``) and the others go on. The pieces, one file each:

=============  ==========================================================================
layout         PSLayout: which ranks serve, which work; the servers' own group
sharding       FlatLayout: the flat parameter vector and its balanced split into shards
protocol       message kinds, headers and tags; every request gets exactly one reply
options        PSOptions (mode, staleness, optimizer, clipping, liveness) and the optimizer
server         ParameterServer: applies gradients to its shard under the chosen mode
worker         PSWorker: pushes gradients, pulls parameters, waits where ssp says so
checkpoint     atomic per-server checkpoints; sync resumes at a step every server saved
launch         a local launcher that lets async/ssp workers die without ending the job
run            the training run: GPT on text or an MLP on scikit-learn's digits, metrics, checkpoints
=============  ==========================================================================
"""

from plait.parallel.parameter_server.layout import PSLayout
from plait.parallel.parameter_server.options import PSOptions
from plait.parallel.parameter_server.server import ParameterServer, ServerStats
from plait.parallel.parameter_server.sharding import FlatLayout
from plait.parallel.parameter_server.worker import PSWorker, StepReport, WorkerEvicted

__all__ = ["FlatLayout", "PSLayout", "PSOptions", "PSWorker", "ParameterServer", "ServerStats",
           "StepReport", "WorkerEvicted"]

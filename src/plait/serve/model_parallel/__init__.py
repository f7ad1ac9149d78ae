"""Model-parallel inference: one engine replica whose model runs on tp × pp processes.

    from plait.serve import EngineConfig, SamplingParams
    from plait.serve.model_parallel import open_engine

    engine = open_engine("runs/tiny_gpt", EngineConfig(max_seqs=16), tp=2, pp=1)
    try:
        print(engine.generate(["The list "], SamplingParams(max_tokens=20, temperature=0))[0].text)
    finally:
        engine.close()

- tensor parallel (`tp`): Megatron-LM column/row layers from the training side split each block's
  heads and MLP; logits are gathered over the group for sampling.
- pipeline parallel (`pp`): stages of consecutive blocks; the running sequences form pp cohorts
  whose steps follow each other through the stages, so the stages work at the same time (or,
  with one cohort, each step's batch is cut into micro-batches that flow through the stages).

The calling process is rank 0 and runs the engine; the others are spawned here and stopped by
`engine.close()`. Greedy output is token-identical to a one-process :class:`~plait.serve.Engine`.

- message.py     the per-step broadcast: the step and the cache moves, as one int64 tensor
- microbatch.py  cutting a step into micro-batches
- shard.py       one rank's layers, heads and KV cache, and their arithmetic
- schedule.py    a step on every rank: micro-batches through the stages
- cohorts.py     the engine that keeps one step of each cohort in flight
- group.py       the layout, the worker processes and their loop
- runner.py      rank 0's runner, which the engine calls
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import torch
import torch.distributed as dist

from plait.errors import ConfigError
from plait.serve.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

__all__ = ["open_engine"]


def open_engine(path: str | Path, config: EngineConfig | None = None, *, tp: int = 1, pp: int = 1,
                device: str = "cpu", micro_batches: int = 0, cohorts: int = 0, threads: int = 0,
                name: str | None = None) -> Engine:
    """An :class:`Engine` for the model at `path` (as `Engine.from_path` takes it) whose model
    runs on tp × pp processes; call `engine.close()` to stop them.

    `cohorts`: groups of running sequences with a step in flight at once, so that a pipeline's
    stages work on different groups' steps at the same time (0 = pp; 1 = one step at a time; see
    :mod:`~plait.serve.model_parallel.cohorts`); a pipeline's engine can change it while idle
    (`engine.cohorts`). `micro_batches`: micro-batches per step through a pipeline (0 = 1 with
    cohorts, else 2 × pp, or 1 without a pipeline; 1 with one cohort = a naive layer split, the
    whole batch through one stage after the other). `threads`: intra-op threads of each
    spawned rank (0 = this machine's cores shared among the tp × pp processes); this process
    keeps its own setting.
    """
    from plait.serve.invariance import probe_row_quantum, probe_span_quantum
    from plait.serve.loader import load_for_serving
    from plait.serve.model_parallel.group import Layout, Workers, build_shard, device_of, stage_bounds
    from plait.serve.model_parallel.runner import ParallelRunner
    from plait.serve.model_parallel.shard import local_linear_shapes
    from plait.serve.scheduler import Scheduler

    if dist.is_initialized():
        raise ConfigError("this process already belongs to a torch.distributed process group; a "
                          "model-parallel engine starts its own: open it in a process of its own "
                          "(one replica per process)")
    config = config or EngineConfig()
    config.check()
    if getattr(config, "quantize", None):
        raise ConfigError(f"quantize={config.quantize!r} applies to one-process engines only; a model split "
                          "over processes (--tp/--pp) is served with its float weights")
    Scheduler(types.SimpleNamespace(max_seqs=config.max_seqs), config.step_tokens, config.prefill_chunk)
    for field, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{field} {value!r} must be an integer ≥ 1")
    if not isinstance(micro_batches, int) or micro_batches < 0:
        raise ConfigError(f"micro_batches={micro_batches!r} must be an integer ≥ 0 (0 = automatic)")
    if not isinstance(cohorts, int) or isinstance(cohorts, bool) or cohorts < 0:
        raise ConfigError(f"cohorts={cohorts!r} must be an integer ≥ 0 (0 = automatic)")
    if cohorts > 1 and pp == 1:
        raise ConfigError(f"cohorts={cohorts} needs a pipeline (--pp ≥ 2); without one use cohorts=1")
    cohorts = cohorts or pp
    if not micro_batches:
        micro_batches = 1 if cohorts > 1 or pp == 1 else 2 * pp
    dev = device_of(device, 0)
    if dev.type == "cuda":
        if torch.cuda.device_count() < tp * pp:
            raise ConfigError(f"tp × pp = {tp * pp} processes need as many GPUs; "
                              f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(dev)
    model, tokenizer, default_name = load_for_serving(path, dev)
    c = model.cfg
    for what, value in (("model.n_head", c.n_head), ("model.n_embd", c.n_embd)):
        if value % tp:
            raise ConfigError(f"--tp {tp} does not divide {what}={value}; choose a tp that divides it")
    bounds = stage_bounds(model, pp)

    # Rows are padded to a quantum that keeps every rank's matrix products batch-invariant.
    quantum = config.row_quantum
    if not quantum:
        probe = torch.nn.ModuleList(torch.nn.Linear(i, o, device=dev, dtype=_dtype(model))
                                    for o, i in local_linear_shapes(model, tp))
        quantum = probe_row_quantum(probe, config.step_tokens)
    spans = config.span_quantum or probe_span_quantum(c.n_head // tp, c.n_embd // c.n_head, c.block_size,
                                                      _dtype(model), dev)
    layout = Layout(tp=tp, pp=pp, max_seqs=config.max_seqs, step_tokens=config.step_tokens, quantum=quantum,
                    span_quantum=spans, micro_batches=micro_batches,
                    device=str(device), bounds=bounds)
    threads = threads or max(1, (os.cpu_count() or 1) // layout.world)
    workers = Workers(path, layout, threads)
    try:
        workers.wait_loaded()
        workers.join()
        shard, place = build_shard(model, layout, 0)
        dist.barrier()
    except BaseException:
        workers.kill()
        raise
    runner = ParallelRunner(shard, place, layout, workers)
    log.info("model-parallel replica: tp=%d × pp=%d processes, stage blocks %s, %d cohorts, %d micro-batches "
             "per step", tp, pp, list(bounds), cohorts, layout.micro_batches)
    try:
        if pp > 1:
            from plait.serve.model_parallel.cohorts import CohortEngine

            return CohortEngine(model, tokenizer, config, name or default_name, runner=runner, cohorts=cohorts)
        return Engine(model, tokenizer, config, name or default_name, runner=runner)
    except BaseException:
        runner.close()
        raise


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype

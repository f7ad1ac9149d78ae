"""Config-time checks of a pipeline layout for the GPT, run before any process starts."""

from __future__ import annotations

from typing import Any

from plait.errors import ConfigError, PlanError
from plait.parallel.pipeline.partition import COSTS, check_layers
from plait.parallel.pipeline.schedules import check_schedule


# Options of other strategies that this version does not combine with pipeline parallelism.
NOT_WITH_PP = {"zero": 0, "offload_optimizer": False, "compression": "none", "node_size": 0}


def check_not_combined(parallel: Any) -> None:
    """Refuse options of other strategies that pipeline stages do not apply (ConfigError)."""
    for name, default in NOT_WITH_PP.items():
        value = getattr(parallel, name, default)
        if value != default:
            raise ConfigError(f"parallel.{name}={value!r} is not supported together with "
                              f"parallel.pp={parallel.pp} in this version; use pp=1 or {name}={default!r}")


def check_pipeline_config(parallel: Any, n_layer: int, micro_batch_size: int, grad_accum: int) -> None:
    """Raise ConfigError naming the field when a GPT of `n_layer` blocks cannot be pipelined as
    `parallel` (a ParallelConfig) says.

    The GPT's layer list is [embedding, n_layer blocks, head]; m is parallel.microbatches, or
    train.grad_accum when that is 0.
    """
    pp, schedule, virtual_stages = parallel.pp, parallel.schedule, parallel.virtual_stages
    microbatches, partition = parallel.microbatches, parallel.partition
    if partition not in COSTS:
        raise ConfigError(f"parallel.partition={partition!r} is invalid; valid: {', '.join(COSTS)}")
    if microbatches < 0:
        raise ConfigError(f"parallel.microbatches={microbatches} must be ≥ 0 (0 = train.grad_accum)")
    check_schedule(schedule, pp, virtual_stages)
    if pp == 1:
        for name, value, neutral in (("microbatches", microbatches, 0), ("virtual_stages", virtual_stages, 1)):
            if value != neutral:
                raise ConfigError(f"parallel.{name}={value} applies to pipelines only; set parallel.pp > 1 "
                                  f"or leave it at {neutral}")
        return
    check_not_combined(parallel)
    samples = micro_batch_size * grad_accum
    if microbatches and samples % microbatches:
        raise ConfigError(
            f"parallel.microbatches={microbatches} must divide the {samples} sequences per step and dp "
            f"rank (train.micro_batch_size={micro_batch_size} × train.grad_accum={grad_accum})"
        )
    try:
        check_layers(n_layer + 2, n_layer, pp, virtual_stages, schedule == "interleaved")
    except PlanError as exc:
        raise ConfigError(str(exc)) from None
    check_schedule(schedule, pp, virtual_stages, microbatches or grad_accum)

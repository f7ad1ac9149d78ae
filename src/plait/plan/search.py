"""Layout search: every dp × pp × tp, ZeRO stage, micro-batch size, schedule, recomputation and
sequence-parallel choice that plait can run, costed, those that do not fit dropped, best first."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from plait.errors import ConfigError, PlanError
from plait.plan.cost import Candidate, Estimate, estimate
from plait.plan.hardware import Cluster
from plait.plan.shapes import ModelShape
from plait.plan.software import PLAIT, Software

log = logging.getLogger(__name__)

RECOMPUTE = ("none", "selective", "full")
FIXABLE = ("dp", "pp", "tp", "zero", "mb", "m", "schedule", "v", "recompute", "sp")


@dataclass
class SearchResult:
    ranked: list[Estimate]     # layouts that fit, fastest first
    considered: int            # layouts costed
    too_big: int               # of those, layouts that did not fit in memory
    smallest_miss: Estimate | None  # the least memory-hungry layout, when none fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_fixed(text: str) -> dict[str, Any]:
    """'tp=8,pp=4,dp=2,mb=1,schedule=1f1b' -> {'tp': 8, ...} (what --layout pins)."""
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in FIXABLE:
            raise PlanError(f"--layout entry {item!r}: use KEY=VALUE with KEY one of {', '.join(FIXABLE)}")
        if key in ("schedule", "recompute"):
            out[key] = value
        elif key == "sp":
            if value.lower() not in ("true", "false", "1", "0"):
                raise PlanError(f"--layout sp={value!r} must be true or false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = int(value)
            except ValueError:
                raise PlanError(f"--layout {key}={value!r} must be an integer") from None
            if out[key] < (0 if key == "zero" else 1):
                raise PlanError(f"--layout {key}={value} is out of range")
    return out


def candidates(shape: ModelShape, devices: int, global_batch: int, software: Software = PLAIT,
               fixed: Mapping[str, Any] | None = None) -> Iterator[Candidate]:
    """Every layout of `devices` devices for `shape` and `global_batch` that `software` can run."""
    fixed = dict(fixed or {})
    for tp in _divisors(devices):
        if shape.n_head % tp or fixed.get("tp", tp) != tp:
            continue
        for pp in _divisors(devices // tp):
            if pp > shape.n_layer or fixed.get("pp", pp) != pp:
                continue
            dp = devices // (tp * pp)
            if global_batch % dp or fixed.get("dp", dp) != dp:
                continue
            per_replica = global_batch // dp
            for mb in _divisors(per_replica):
                m = per_replica // mb
                if fixed.get("mb", mb) != mb or fixed.get("m", m) != m:
                    continue
                yield from _knobs(shape, software, fixed, dp, pp, tp, mb, m)


def _knobs(shape, software, fixed, dp, pp, tp, mb, m) -> Iterator[Candidate]:
    schedules = [("1f1b", 1)]
    if pp > 1:
        schedules = [(s, 1) for s in software.schedules if s != "interleaved"]
        if "interleaved" in software.schedules and m % pp == 0:
            schedules += [("interleaved", v) for v in range(2, 9) if shape.n_layer % (pp * v) == 0]
    zeros = [0] if dp == 1 or (pp > 1 and not software.zero_with_pp) else [0, 1, 2, 3]
    sps = [False, True] if tp > 1 and software.sequence_parallel and shape.seq % tp == 0 else [False]
    for schedule, v in schedules:
        if fixed.get("schedule", schedule) != schedule or fixed.get("v", v) != v:
            continue
        for zero in zeros:
            if fixed.get("zero", zero) != zero:
                continue
            for recompute in RECOMPUTE:
                if fixed.get("recompute", recompute) != recompute:
                    continue
                for sp in sps:
                    if fixed.get("sp", sp) == sp:
                        yield Candidate(dp, pp, tp, zero, mb, schedule, v, recompute, sp)


def plait_accepts(shape: ModelShape, cand: Candidate, microbatches: int) -> str | None:
    """None when plait's own config rules accept the layout, else the reason they give."""
    from plait.config import Config, ModelConfig, ParallelConfig, TrainConfig, validate

    cfg = Config(
        model=ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                          block_size=shape.seq, vocab_size=shape.vocab, dropout=shape.dropout,
                          bias=shape.bias),
        train=TrainConfig(micro_batch_size=cand.micro_batch, grad_accum=microbatches),
        parallel=ParallelConfig(dp=cand.dp, pp=cand.pp, tp=cand.tp, zero=cand.zero,
                                recompute=cand.recompute, sequence_parallel=cand.sequence_parallel,
                                schedule=cand.schedule if cand.pp > 1 else "1f1b",
                                virtual_stages=cand.virtual_stages))
    try:
        validate(cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def search(shape: ModelShape, cluster: Cluster, global_batch: int, software: Software = PLAIT,
           fixed: Mapping[str, Any] | None = None) -> SearchResult:
    """Cost every layout and rank those that fit memory by predicted step time."""
    ranked, considered, too_big = [], 0, 0
    smallest: Estimate | None = None
    rules: dict[tuple, str | None] = {}
    for cand in candidates(shape, cluster.devices, global_batch, software, fixed):
        m = global_batch // (cand.dp * cand.micro_batch)
        if software.validate_with_config:
            key = (cand.pp, cand.tp, cand.zero, cand.schedule, cand.virtual_stages, cand.recompute,
                   cand.sequence_parallel, cand.dp > 1, m % cand.pp == 0)
            if key not in rules:
                rules[key] = plait_accepts(shape, cand, m)
            if rules[key] is not None:
                continue
        est = estimate(shape, cluster, cand, global_batch, software)
        considered += 1
        if est.fits:
            ranked.append(est)
        else:
            too_big += 1
            if smallest is None or est.memory.total < smallest.memory.total:
                smallest = est
    ranked.sort(key=lambda e: (e.step_s, e.memory.total))
    log.info("costed %d layouts, %d fit", considered, len(ranked))
    return SearchResult(ranked, considered, too_big, None if ranked else smallest)

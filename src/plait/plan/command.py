"""`plait plan`: its options and what it computes; the CLI prints the result.

Imports stay inside functions so that building the CLI's parser costs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass
class PlanOutput:
    renderables: list[Any] = field(default_factory=list)  # rich renderables, in order
    json_text: str | None = None
    emitted: Path | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a named GPT (gpt-125m … gpt-1t) or a plait config file")
    p.add_argument("--gpus", type=int, help="devices (with --gpu cpu: processes on this machine)")
    p.add_argument("--gpu", help="a100, a100-40gb, h100, h200, b200, or cpu (this CPU, calibrated once); "
                                 "default h100 (with --check: cpu, for runs on the CPU)")
    p.add_argument("--nodes", type=int, help="nodes the GPUs are spread over (default 8 GPUs a node)")
    p.add_argument("--intra", help="intra-node link (default per GPU: nvlink3/4/5)")
    p.add_argument("--inter", help="inter-node link (default per GPU: ib-hdr/ib-ndr)")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: 512, or the config's)")
    p.add_argument("--seq", type=int, help="sequence length (default: the model's)")
    p.add_argument("--layout", help="predict this layout instead of searching, e.g. tp=8,pp=4,dp=2; "
                                    "also pins zero, mb, m, schedule, v, recompute, sp (the rest is searched)")
    p.add_argument("--top", type=int, default=5, help="layouts to show (default 5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--emit", metavar="CONFIG", help="write the best layout as a plait config")
    p.add_argument("--check", metavar="RUN_DIR", help="compare a finished run's measured step time with "
                                                      "the prediction for its layout")
    p.add_argument("--threads", type=int, help="with --gpu cpu: threads per process "
                                               "(default: cores / processes, as plait train does)")
    p.add_argument("--software", default="plait", help="plait, or megatron-2021 (to compare with "
                                                       "Narayanan et al. 2021)")


def _model(spec: str | None, seq: int | None):
    from plait.errors import PlanError
    from plait.plan.shapes import named_model, shape_from_config

    if not spec:
        raise PlanError("--model is required: a named GPT (gpt-125m … gpt-1t) or a plait config file")
    base = None
    if spec.endswith(".toml") or Path(spec).is_file():
        from plait.config import load_config

        cfg = load_config(spec)
        shape, base = shape_from_config(cfg.model, name=Path(spec).stem), cfg
    else:
        shape = named_model(spec)
    if seq:
        if seq < 1:
            raise PlanError(f"--seq {seq} must be ≥ 1")
        shape = replace(shape, seq=seq)
    return shape, base


def _cluster(args, gpu: str, devices: int):
    from plait.plan.hardware import cpu_cluster, gpu_cluster

    if gpu.strip().lower() == "cpu":
        from plait.plan.calibrate import calibrate_cpu

        threads = args.threads or max(1, len(os.sched_getaffinity(0)) // devices)
        return cpu_cluster(calibrate_cpu(threads), devices, threads)
    return gpu_cluster(gpu, devices, args.nodes, args.intra, args.inter)


def run(args: argparse.Namespace) -> PlanOutput:
    from plait.errors import PlanError
    from plait.plan.render import layouts_table, reasoning
    from plait.plan.search import parse_fixed, search
    from plait.plan.software import SOFTWARE

    if args.software not in SOFTWARE:
        raise PlanError(f"--software {args.software!r} is unknown; valid: {', '.join(SOFTWARE)}")
    if args.top < 1:
        raise PlanError(f"--top {args.top} must be ≥ 1")
    if args.check:
        return _check(args)
    shape, base = _model(args.model, args.seq)
    fixed = parse_fixed(args.layout) if args.layout else {}
    devices = args.gpus
    if devices is None and all(k in fixed for k in ("dp", "pp", "tp")):
        devices = fixed["dp"] * fixed["pp"] * fixed["tp"]
    if devices is None or devices < 1:
        raise PlanError("--gpus N is required (≥ 1), unless --layout gives dp, pp and tp")
    cluster = _cluster(args, args.gpu or "h100", devices)
    batch = args.global_batch
    if batch is None:
        if base is not None:
            p = base.parallel
            dp = p.dp or max(1, devices // (p.pp * p.tp))
            batch = base.train.micro_batch_size * base.train.grad_accum * dp
        else:
            batch = 512
    if batch < 1:
        raise PlanError(f"--global-batch {batch} must be ≥ 1")
    result = search(shape, cluster, batch, SOFTWARE[args.software], fixed)
    if not result.ranked:
        raise PlanError(_nothing_fits(result, cluster, fixed))
    top = result.ranked[:args.top]
    out = PlanOutput()
    if args.emit:
        from plait.plan.emit import config_dict, write_config

        best = top[0]
        raw = config_dict(best, shape, base.to_dict() if base is not None else None)
        header = (f"Written by `plait plan`: {shape.name} on {cluster.devices} × {cluster.device.name}, "
                  f"predicted {best.step_s:.4g} s per step, {best.tokens_per_s:,.0f} tokens/s.")
        out.emitted = write_config(args.emit, raw, header)
    if args.json:
        out.json_text = json.dumps({
            "model": {"name": shape.name, "n_layer": shape.n_layer, "n_head": shape.n_head,
                      "n_embd": shape.n_embd, "seq": shape.seq, "vocab": shape.vocab,
                      "params": shape.num_params()},
            "cluster": {"device": cluster.device.name, "devices": cluster.devices, "per_node": cluster.per_node,
                        "intra": cluster.intra.name, "inter": cluster.inter.name},
            "global_batch": batch, "software": args.software, "considered": result.considered,
            "did_not_fit": result.too_big, "layouts": [e.as_dict() for e in top]}, indent=2)
        return out
    title = None if not args.layout else f"prediction for --layout {args.layout}"
    out.renderables += [layouts_table(top, shape, cluster, batch, title), reasoning(top[0], cluster),
                        (f"costed {result.considered} layouts; {result.too_big} did not fit in "
                        f"{cluster.device.mem_bytes / 1e9:.3g} GB per device")]
    return out


def _nothing_fits(result, cluster, fixed) -> str:
    if result.smallest_miss is None:
        pinned = f" with --layout {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""
        return (f"no layout of {cluster.devices} devices{pinned} can run this model and batch (dp must "
                "divide the global batch, tp the heads, pp ≤ layers)")
    e = result.smallest_miss
    return (f"no layout fits in {cluster.device.mem_bytes / 1e9:.3g} GB per device: the smallest "
            f"({e.candidate.label()}, ZeRO {e.candidate.zero}, recompute {e.candidate.recompute}) needs "
            f"{e.memory.total / 1e9:.3g} GB; use more or larger devices, or a smaller global batch")


def _check(args) -> PlanOutput:
    from plait.errors import PlanError
    from plait.plan.check import check_run, run_config
    from plait.plan.render import check_table, reasoning

    raw, mesh = None, None
    if args.model and Path(args.model).is_file():
        from plait.config import load_config

        raw = load_config(args.model).to_dict()
    saved_raw, mesh = run_config(args.check) if raw is None or args.gpus is None else (None, None)
    raw = raw or saved_raw
    if mesh is None:
        p = raw["parallel"]
        dp = p["dp"] or args.gpus // (p["pp"] * p["tp"])
        mesh = {"dp": dp, "pp": p["pp"], "tp": p["tp"]}
    world = mesh["dp"] * mesh["pp"] * mesh["tp"]
    gpu = args.gpu
    if gpu is None:
        if raw["train"].get("device") == "cuda":
            raise PlanError("the run trained on CUDA devices: name them with --gpu (a100, h100, ...)")
        gpu = "cpu"
    cluster = _cluster(args, gpu, world)
    result = check_run(args.check, cluster, raw, mesh)
    out = PlanOutput()
    if args.json:
        out.json_text = json.dumps(result.as_dict(), indent=2)
    else:
        out.renderables += [check_table(result), reasoning(result.estimate, cluster)]
    return out

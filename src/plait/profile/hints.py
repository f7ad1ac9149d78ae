"""Plain-language hints from an :class:`~plait.profile.analysis.Analysis`: what to change, and why.

Each rule reads the measured breakdown and the run's config and names the setting to change.
"""

from __future__ import annotations

import statistics

from plait.profile.analysis import Analysis

# A share of the step beyond which a cost is worth a hint.
COMM_SHARE = 0.30
BUBBLE_SHARE = 0.20
DATA_SHARE = 0.10
IDLE_SHARE = 0.15
LOW_OVERLAP = 0.30


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def hints(a: Analysis) -> list[str]:
    """The hints for one run, most important first (empty without traces or metrics)."""
    out: list[str] = []
    cfg = a.config
    parallel, train = cfg.get("parallel", {}), cfg.get("train", {})
    shape = a.shape
    slow = {s.rank for s in a.stragglers}
    for s in a.stragglers:
        what = {"data": "loading data (look for a slow disk or too few loader workers there)",
                "optimizer": "its optimizer step (look for memory pressure or offload there)"}.get(
            s.phase or "", f"{s.phase or 'compute'}")
        head = (f"rank {s.rank} is a straggler, {s.ratio:.2f}× its peers' busy time, losing most in "
                f"{what}: every other rank waits for it at each collective.")
        if cfg.get("profile", {}).get("balance") == "speed":
            split = next((m["dp_split"] for m in a.metrics if "dp_split" in m), None)
            out.append(head + (f" The batch is already split by speed ({split}); " if split else
                               " Stages are already cut by speed; ")
                       + "its speed changed since it was measured, or the split is too coarse: "
                         "measure over more steps (profile.balance_steps) or give each draw more "
                         "sequences (train.micro_batch_size).")
            continue
        out.append(head + ' If its hardware is slower, set profile.balance = "speed" to give it a '
                          "share of each batch (and of the pipeline's layers) in proportion to its "
                          "speed; if not, look for other load on its machine.")
    if a.imbalance is not None and a.imbalance[1] > 1.0 + a.threshold:
        stage, ratio = a.imbalance
        out.append(f"pipeline stage {stage} does {ratio:.2f}× the compute of the other stages (median), "
                   f"which wait for it: partition by measured time (parallel.partition = \"time\", now "
                   f"{parallel.get('partition', 'params')!r}), or, if its hardware is slower, set "
                   "profile.balance = \"speed\" to cut the stages by measured speed.")
    if not a.ranks:
        return out
    steps = statistics.fmean(r.step_s for r in a.ranks)
    healthy = [r for r in a.ranks if r.rank not in slow] or a.ranks
    comm = statistics.fmean(_share(r.comm_s, r.step_s) for r in healthy)
    if shape is not None and shape.dp > 1 and parallel.get("reducer") == "naive" and comm > 0.05:
        out.append(f"all-reduce not overlapped: communication is {comm:.0%} of the step and the naive "
                   "reducer starts it only after backward; enable the bucketed reducer "
                   "(parallel.reducer = \"bucketed\") so buckets are reduced during backward.")
    elif comm > COMM_SHARE and not slow:
        overlap = a.overlap_share
        tail = ""
        if overlap is not None and overlap < LOW_OVERLAP and shape is not None and shape.dp > 1:
            tail = (f" Only {overlap:.0%} of it overlapped compute: lower parallel.bucket_mb (now "
                    f"{parallel.get('bucket_mb', 25.0)}) so the first buckets start while backward runs.")
        out.append(f"communication is {comm:.0%} of the step: reduce what is sent (parallel.compression "
                   "= \"bf16\" or \"powersgd\"), or send less often per sample (a larger "
                   "train.micro_batch_size or train.grad_accum)." + tail)
    elif (comm > 0.10 and not slow and shape is not None and shape.dp > 1
          and a.overlap_share is not None and a.overlap_share < LOW_OVERLAP):
        out.append(f"only {a.overlap_share:.0%} of the gradient all-reduce overlapped compute "
                   f"(communication is {comm:.0%} of the step): with parallel.bucket_mb = "
                   f"{parallel.get('bucket_mb', 25.0)} the gradients fill few buckets, launched at the "
                   "end of backward; lower bucket_mb so the first buckets are reduced while backward "
                   "runs.")
    elif comm > COMM_SHARE and slow:
        out.append(f"communication is {comm:.0%} of the healthy ranks' step, mostly waiting for "
                   f"rank {sorted(slow)[0]}: fix the straggler first.")
    bubble = a.metric_mean("bubble") if shape is not None and shape.pp > 1 else None
    bubble = a.trace_bubble if bubble is None else bubble
    if bubble is not None and bubble > BUBBLE_SHARE:
        m = parallel.get("microbatches") or train.get("grad_accum", 1)
        schedule = parallel.get("schedule", "1f1b")
        out.append(f"bubble {bubble:.0%}: the stages idle while the pipeline fills and drains "
                   f"({shape.pp} stages, m = {m} micro-batches, schedule {schedule}); raise "
                   "micro-batches (train.grad_accum, or parallel.microbatches) to 4× the stages or "
                   "more" + ("" if schedule == "interleaved" else
                             ", or use parallel.schedule = \"interleaved\" with virtual_stages = 2") + ".")
    data = statistics.fmean(_share(r.phases.get("data", 0.0), r.step_s) for r in a.ranks)
    if data > DATA_SHARE:
        out.append(f"data loading is {data:.0%} of the step: prepare batches ahead (a cached corpus, "
                   "data.cache_dir) or give the step more work per batch.")
    if shape is not None and shape.pp == 1:
        idle = statistics.fmean(_share(r.idle_s, r.step_s) for r in healthy)
        if idle > IDLE_SHARE:
            out.append(f"{idle:.0%} of the step is neither compute nor communication on the training "
                       "thread (host overhead between operations, synchronisation): larger micro-batches "
                       "amortise it.")
    if not out:
        compute = statistics.fmean(_share(r.compute_s, r.step_s) for r in a.ranks)
        out.append(f"no bottleneck stands out: compute is {compute:.0%} of the {steps * 1e3:.1f} ms step "
                   "on average.")
    return out

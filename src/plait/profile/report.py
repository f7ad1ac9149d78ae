"""`plait report RUN_DIR`: a folder of PNG plots and a text summary of where a run's time went.

    report = write_report("runs/tiny_gpt")        # -> runs/tiny_gpt/report/
    print(report.text)

Written: `summary.txt` (what the CLI prints), `summary.json` (the same figures for scripts), and
`loss.png`, `throughput.png`, with traces also `timeline.png` and `breakdown.png`, with live
statistics `rank_busy.png`, and with GPU traces and HTA installed `hta_temporal.png`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait.profile import plots
from plait.profile.analysis import DEFAULT_THRESHOLD, Analysis, analyse
from plait.profile.capture import trace_path
from plait.profile.hints import hints
from plait.profile.hta import HtaResult, hta_breakdown

LEGEND = ("  (compute: running operations, by phase; comm: inside or waiting on a collective;\n"
          "   idle: neither, for pipelines mostly the bubble; clock: the trainer's own step time)")


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    folder: Path
    text: str
    files: list[Path] = field(default_factory=list)
    analysis: Analysis | None = None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def summary_lines(a: Analysis, hta: HtaResult, advice: list[str]) -> list[str]:
    """The text summary."""
    lines = [f"plait report: {a.run_dir}"]
    steps = [m["step"] for m in a.metrics if "loss" in m]
    if steps:
        last = next(m for m in reversed(a.metrics) if "loss" in m)
        vals = [m["val_loss"] for m in a.metrics if "val_loss" in m]
        lines.append(f"run: steps {min(steps)}-{max(steps)} logged, last loss {last['loss']:.4f}"
                     + (f", last held-out loss {vals[-1]:.4f}" if vals else ""))
        tps = a.metric_mean("tokens_per_s")
        if tps is not None:
            mfu = a.metric_mean("mfu")
            lines.append(f"throughput: {tps:,.0f} tokens/s mean" + (f", MFU {mfu:.1%}" if mfu is not None else
                                                                   " (MFU: no known peak for this device)"))
    if not a.traced:
        lines.append("no traces: rerun with `plait train CONFIG --profile N` for per-rank timelines")
    else:
        r0 = a.ranks[0]
        shape = a.shape
        lines.append(f"traced: steps {', '.join(map(str, r0.steps))} on {len(a.ranks)} ranks "
                     f"(mesh dp={shape.dp} × pp={shape.pp} × tp={shape.tp})")
        lines.append("")
        lines.append("per rank, ms per step (median over the traced steps):")
        header = (f"{'rank':>4} {'stage':>5} {'step':>7} {'compute':>8} {'comm':>7} {'idle':>7} "
                  f"{'data':>6} {'fwd':>7} {'bwd':>7} {'optim':>7} {'other':>6}  {'clock':>7}")
        lines.append(header)
        for r in a.ranks:
            p = r.phases
            lines.append(f"{r.rank:>4} {r.coords.get('pp', 0):>5} {_ms(r.step_s):>7} {_ms(r.compute_s):>8} "
                         f"{_ms(r.comm_s):>7} {_ms(r.idle_s):>7} {_ms(p['data']):>6} {_ms(p['forward']):>7} "
                         f"{_ms(p['backward']):>7} {_ms(p['optimizer']):>7} {_ms(p['other']):>6}  "
                         f"{_ms(r.measured_step_s):>7}")
        lines.append(LEGEND)
        overlap = a.overlap_share
        if overlap is not None:
            flight = a.comm_in_flight_s / len(a.ranks)
            exposed = sum(r.comm_s for r in a.ranks) / len(a.ranks)
            lines.append(f"communication: {_ms(flight)} ms per step in flight, {_ms(exposed)} ms exposed on the "
                         f"training thread; {overlap:.0%} of it overlapped compute")
        if shape.pp > 1:
            bubble = a.metric_mean("bubble")
            theory = a.metric_mean("bubble_theory")
            trace_bubble = a.trace_bubble
            parts = []
            if bubble is not None:
                parts.append(f"{bubble:.0%} measured by the runtime")
            if trace_bubble is not None:
                parts.append(f"{trace_bubble:.0%} idle in the traces")
            if theory is not None:
                parts.append(f"{theory:.0%} in theory for equal stages")
            lines.append("pipeline bubble: " + ", ".join(parts))
        if a.stragglers:
            for s in a.stragglers:
                lines.append(s.describe())
        elif a.imbalance is not None:
            stage, ratio = a.imbalance
            lines.append(f"stragglers: none among peers (threshold {a.threshold:.0%}); pipeline stage "
                         f"{stage} is the busiest, {ratio:.2f}× the median of the other stages")
        else:
            slowest = max(a.ranks, key=lambda r: r.compute_s)
            lines.append(f"stragglers: none (threshold {a.threshold:.0%} over the median of its peers); "
                         f"the busiest rank is {slowest.rank} ({_ms(slowest.compute_s)} ms compute)")
    if a.live_stragglers:
        flagged = ", ".join(f"rank {r} ({n}×)" for r, n in sorted(a.live_stragglers.items()))
        lines.append(f"live statistics flagged: {flagged}")
    split = next((m["dp_split"] for m in a.metrics if "dp_split" in m), None)
    if split is not None:
        lines.append(f"uneven hardware: each draw split {split} over the dp ranks")
    if hta.temporal:
        lines.append("")
        lines.append("GPU (Holistic Trace Analysis), % of time per rank:")
        for row in hta.temporal:
            lines.append(f"  rank {row.get('rank')}: idle {row.get('idle_time_pctg', 0):.1f}, compute "
                         f"{row.get('compute_time_pctg', 0):.1f}, non-compute {row.get('non_compute_time_pctg', 0):.1f}")
        for row in hta.overlap:
            lines.append(f"  rank {row.get('rank')}: communication overlapped by compute "
                         f"{row.get('comp_comm_overlap_pctg', 0):.1f}%")
    elif a.traced:
        lines.append(f"HTA: {hta.skipped}")
    lines.append("")
    lines.append("hints:")
    lines += [f"- {h}" for h in advice] or ["- none"]
    return lines


def _json(a: Analysis, hta: HtaResult, advice: list[str]) -> dict[str, Any]:
    ranks = [{k: v for k, v in asdict(r).items() if k != "breakdowns"} for r in a.ranks]
    return {"run_dir": str(a.run_dir), "ranks": ranks,
            "stragglers": [{**asdict(s), "ratio": s.ratio} for s in a.stragglers],
            "threshold": a.threshold, "overlap_share": a.overlap_share,
            "bubble": a.metric_mean("bubble"), "trace_bubble": a.trace_bubble,
            "stage_imbalance": a.imbalance, "live_stragglers": a.live_stragglers,
            "hta": asdict(hta), "hints": advice}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> Report:
    """Analyse `run_dir` and write the report folder (default RUN_DIR/report)."""
    a = analyse(run_dir, threshold)
    folder = Path(out_dir) if out_dir is not None else a.run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    hta = hta_breakdown({r.rank: trace_path(a.run_dir / "profile", r.rank) for r in a.ranks}, a.gpu) \
        if a.traced else HtaResult(skipped="no traces")
    advice = hints(a)
    text = "\n".join(summary_lines(a, hta, advice)) + "\n"
    files = []
    for name, draw in (("loss.png", plots.plot_loss), ("throughput.png", plots.plot_throughput),
                       ("timeline.png", plots.plot_timeline), ("breakdown.png", plots.plot_breakdown),
                       ("rank_busy.png", plots.plot_rank_busy)):
        path = draw(a, folder / name)
        if path is not None:
            files.append(path)
    if hta.temporal:
        path = plots.plot_hta(hta.temporal, folder / "hta_temporal.png")
        if path is not None:
            files.append(path)
    (folder / "summary.txt").write_text(text)
    (folder / "summary.json").write_text(json.dumps(_json(a, hta, advice), indent=1, default=str) + "\n")
    files += [folder / "summary.txt", folder / "summary.json"]
    return Report(folder, text, files, a)

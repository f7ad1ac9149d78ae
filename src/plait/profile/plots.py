"""The report's PNG plots (matplotlib, `pip install plait[report]`).

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so no GUI backend or global
figure state is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plait.errors import ConfigError
from plait.profile.analysis import Analysis

COLORS = {
    "data": "#8c564b", "forward": "#1f77b4", "backward": "#2ca02c", "optimizer": "#9467bd",
    "other": "#7f7f7f", "communication": "#d62728", "bubble": "#ff7f0e", "idle": "#e6e6e6",
}
COMPUTE = ("data", "forward", "backward", "optimizer", "other")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plait report draws its plots with matplotlib, which is not installed; "
                          "install it with `pip install plait[report]`") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path)
    return path


def plot_loss(a: Analysis, path: Path) -> Path | None:
    """Training loss and held-out loss against the step."""
    train = [(m["step"], m["loss"]) for m in a.metrics if "loss" in m and "step" in m]
    val = [(m["step"], m["val_loss"]) for m in a.metrics if "val_loss" in m and "step" in m]
    if not train and not val:
        return None
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), "o-" if len(train) < 30 else "-", label="training loss", color="#1f77b4",
                lw=1.2, ms=3)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss", color="#d62728", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_throughput(a: Analysis, path: Path) -> Path | None:
    """Tokens per second (and MFU where the device's peak is known) against the step."""
    rows = [(m["step"], m["tokens_per_s"]) for m in a.metrics if "tokens_per_s" in m and "step" in m]
    if not rows:
        return None
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    ax.plot(*zip(*rows), "o-" if len(rows) < 30 else "-", color="#2ca02c", lw=1.2, ms=3, label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    mfu = [(m["step"], 100 * m["mfu"]) for m in a.metrics if "mfu" in m and "step" in m]
    if mfu:
        twin = ax.twinx()
        twin.plot(*zip(*mfu), color="#9467bd", lw=1.0, ls="--", label="MFU %")
        twin.set_ylabel("MFU (%)")
        ax.set_title("throughput and model FLOPs utilisation")
    else:
        ax.set_title("throughput (MFU: no known peak for this device)")
    return _save(fig, path)


def plot_timeline(a: Analysis, path: Path) -> Path | None:
    """Each rank's time in one step: compute by phase, communication, bubble, idle."""
    if not a.ranks or a.timeline_step is None:
        return None
    step = a.timeline_step
    fig = _figure(9.0, 1.6 + 0.45 * len(a.ranks))
    ax = fig.add_subplot()
    slow = {s.rank for s in a.stragglers}
    labels, seen = [], set()
    for y, r in enumerate(a.ranks):
        b = next((b for b in r.breakdowns if b.step == step), None)
        if b is None:
            continue
        for kind in COLORS:
            spans = [(s * 1e3, (e - s) * 1e3) for s, e, k in b.segments if k == kind]
            if spans:
                ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=COLORS[kind],
                               label=kind if kind not in seen else None)
                seen.add(kind)
        labels.append(f"rank {r.rank}" + (" (straggler)" if r.rank in slow else ""))
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms since the start of step {step}")
    ax.set_title(f"per-rank timeline of step {step}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_breakdown(a: Analysis, path: Path) -> Path | None:
    """Per-rank stacked bars: compute by phase, communication, idle (medians over traced steps)."""
    if not a.ranks:
        return None
    fig = _figure(7.2, 1.6 + 0.45 * len(a.ranks))
    ax = fig.add_subplot()
    slow = {s.rank for s in a.stragglers}
    ys = list(range(len(a.ranks)))
    left = [0.0] * len(a.ranks)
    parts = [(k, [r.phases[k] * 1e3 for r in a.ranks]) for k in COMPUTE]
    parts.append(("communication", [r.comm_s * 1e3 for r in a.ranks]))
    parts.append(("idle", [r.idle_s * 1e3 for r in a.ranks]))
    for kind, widths in parts:
        ax.barh(ys, widths, left=left, color=COLORS[kind], label=kind, height=0.7)
        left = [x + w for x, w in zip(left, widths)]
    ax.set_yticks(ys, [f"rank {r.rank}" + (" (straggler)" if r.rank in slow else "") for r in a.ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (median over the traced steps)")
    ax.set_title("where each rank's step goes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_rank_busy(a: Analysis, path: Path) -> Path | None:
    """Live statistics: each rank's busy time per step over the run (straggler warnings)."""
    rows = [(m["step"], m["rank_busy_s"]) for m in a.metrics if isinstance(m.get("rank_busy_s"), list)]
    if not rows:
        return None
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    world = max(len(b) for _, b in rows)
    for r in range(world):
        pts = [(s, b[r] * 1e3) for s, b in rows if r < len(b)]
        ax.plot(*zip(*pts), "o-", lw=1.0, ms=3, label=f"rank {r}")
    ax.set_xlabel("step")
    ax.set_ylabel("busy ms per step")
    ax.set_title("live statistics: busy time per rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(world, 4))
    return _save(fig, path)


def plot_hta(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """HTA's temporal breakdown per rank (GPU traces): idle, compute and non-compute shares."""
    if not rows:
        return None
    fig = _figure(6.4, 1.4 + 0.5 * len(rows))
    ax = fig.add_subplot()
    keys = [("idle_time_pctg", "idle", "#e6e6e6"), ("compute_time_pctg", "compute", "#1f77b4"),
            ("non_compute_time_pctg", "non-compute (communication, memory)", "#d62728")]
    left = [0.0] * len(rows)
    for key, label, color in keys:
        widths = [float(r.get(key, 0.0)) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, color=color, label=label)
        left = [x + w for x, w in zip(left, widths)]
    ax.set_yticks(range(len(rows)), [f"rank {r.get('rank', i)}" for i, r in enumerate(rows)])
    ax.set_xlabel("% of GPU time (Holistic Trace Analysis)")
    ax.set_title("GPU temporal breakdown")
    ax.legend(fontsize=8)
    return _save(fig, path)

"""What a sweep leaves for people: a ranked table, the best config as TOML, the loss curves.

Read from the trial folders (plait.tune.trial), so a resumed sweep's table covers every trial.
Written into the sweep folder: `results.json` (the table's rows), `best.toml` (the base config
with the best trial's values: `plait train best.toml` trains it) and `curves.png` (held-out loss
against the step, one line per trial; matplotlib, `pip install plait[report]`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait.config import Config, config_toml
from plait.errors import ConfigError
from plait.tune.space import set_field
from plait.tune.sweep import Sweep
from plait.tune.trial import TrialRecord, held_out_curve


@dataclass
class TrialRow:
    """One trial in the table."""

    trial_id: str
    point: dict[str, Any]
    status: str  # finished, stopped (early, by the scheduler), failed, running (interrupted)
    best_loss: float | None
    steps: int  # the last step with a held-out loss
    max_steps: int
    wall_s: float
    nproc: int
    error: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SweepResult:
    """Rows best first (trials without a held-out loss last) and the files written."""

    rows: list[TrialRow]
    out_dir: Path
    best_config: Path | None = None
    curves: Path | None = None
    table: Path | None = None

    @property
    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].best_loss is not None else None


def collect(sweep: Sweep) -> list[TrialRow]:
    """Every trial of `sweep`, ranked by best held-out loss."""
    rows = []
    for folder in sorted(p for p in sweep.trials_dir.glob("*") if p.is_dir()):
        record = TrialRecord.read(folder)
        if record is None:
            continue
        points = dict(held_out_curve(folder))
        points.update((int(s), float(v)) for s, v in record.extra.get("reported", []))
        curve = sorted((s, v) for s, v in points.items() if s > 0)
        rows.append(TrialRow(record.trial_id, record.point, record.status,
                             min((v for _, v in curve), default=None), curve[-1][0] if curve else 0,
                             record.max_steps, record.wall_s, record.nproc, record.error, curve))
    rows.sort(key=lambda r: (r.best_loss is None, r.best_loss if r.best_loss is not None else 0.0,
                             r.trial_id))
    return rows


def best_config_toml(sweep: Sweep, row: TrialRow) -> str:
    """The base config with `row`'s values, as TOML for `plait train` (no [tune] table)."""
    raw = copy.deepcopy(sweep.base)
    for name, value in row.point.items():
        set_field(raw, name, value)
    cfg = Config.from_dict(raw).to_dict()
    cfg.pop("tune")
    head = (f"# Best trial {row.trial_id} of the sweep in {sweep.out_dir}: held-out loss "
            f"{row.best_loss:.4f} at step {row.steps}\n"
            + "".join(f"# {k} = {v!r}\n" for k, v in row.point.items()))
    return head + config_toml(cfg)


def plot_curves(rows: list[TrialRow], path: Path) -> Path | None:
    """Held-out loss against the step for every trial; the best drawn thick."""
    drawn = [r for r in rows if r.curve]
    if not drawn:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plait tune draws its loss curves with matplotlib, which is not installed; "
                          "install it with `pip install plait[report]`") from None
    fig = Figure(figsize=(7.2, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, r in enumerate(drawn):
        steps, losses = zip(*r.curve)
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in r.point.items())
        best = i == 0
        ax.plot(steps, losses, "o-" if len(steps) < 30 else "-", lw=2.4 if best else 1.0, ms=3,
                alpha=1.0 if best else 0.7, label=("best: " if best else "") + label,
                zorder=3 if best else 2)
        if r.status == "stopped":
            ax.plot(steps[-1], losses[-1], "x", color="black", ms=6, zorder=4)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.set_title(f"{len(drawn)} trials (x: stopped early)")
    ax.grid(alpha=0.3, which="both")
    if len(drawn) <= 12:
        ax.legend(fontsize=7)
    fig.savefig(path)
    return path


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_results(sweep: Sweep) -> SweepResult:
    """Collect the trials and write results.json, best.toml and curves.png into the sweep folder."""
    rows = collect(sweep)
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(rows, out)
    result.table = out / "results.json"
    result.table.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    if result.best is not None:
        result.best_config = out / "best.toml"
        result.best_config.write_text(best_config_toml(sweep, result.best))
    result.curves = plot_curves(rows, out / "curves.png")
    return result

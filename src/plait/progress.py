"""Terminal progress for the CLI: a rich progress bar and eval lines (main rank only).

Paths and other user text are printed literally (rich markup off), so a folder named
`exp[v2]` is shown as it is, not read as a style tag.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from plait.train.trainer import Callbacks


def progress_callbacks(console: Console | None = None) -> Callbacks:
    """Callbacks that draw a progress bar on `console` (stderr by default)."""
    console = console or Console(stderr=True)
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:,.0f} tok/s"),
                   TimeRemainingColumn(), console=console, transient=False)
    task: dict[str, Any] = {}

    def on_start(info: dict[str, Any]) -> None:
        resumed = f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""
        console.print(f"{info['mesh']}, {info['params']:,} parameters, "
                      f"{info['tokens_per_step']:,} tokens/step{resumed}", markup=False, highlight=False)
        bar.start()
        task["id"] = bar.add_task("train", total=info["steps"], completed=info["start_step"],
                                  loss=float("nan"), tps=0.0)

    def on_step(rec: dict[str, Any]) -> None:
        bar.update(task["id"], completed=rec["step"], loss=rec["loss"], tps=rec["tokens_per_s"])

    def on_eval(rec: dict[str, Any]) -> None:
        train = f"train loss {rec['loss']:.3f}  " if "loss" in rec else ""
        bar.console.print(f"step {rec['step']:>5}  {train}held-out loss {rec['val_loss']:.3f}",
                          markup=False, highlight=False)

    def on_end(summary: dict[str, Any]) -> None:
        bar.stop()
        if summary.get("checkpoint"):
            console.print(f"checkpoint: {summary['checkpoint']}", markup=False, highlight=False)

    return Callbacks(on_start=on_start, on_step=on_step, on_eval=on_eval, on_end=on_end)


def summary_table(summary: dict[str, Any], title: str = "run summary", loss_label: str = "held-out loss") -> Table:
    """A finished run's steps, final held-out loss, throughput and checkpoint, as a table."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["step"]))
    if summary.get("final_val_loss") is not None:
        table.add_row(loss_label, f"{summary['final_val_loss']:.4f}")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}")
    table.add_row("checkpoint", Text(str(summary.get("checkpoint") or "-")))
    return table

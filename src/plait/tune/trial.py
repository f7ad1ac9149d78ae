"""One trial of a sweep: its config, its process count, and the record it leaves behind.

Every trial is a plait training run in its own folder `<sweep>/trials/<trial_id>/`, holding the
run's usual files (metrics.jsonl, checkpoints) plus `trial.json`: what was tried, how it ended
(finished, stopped early by the scheduler, or failed, with the error) and its wall time. The
results table is read from these folders, so it covers a sweep that was interrupted and resumed.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait.config import Config
from plait.tune.space import set_field

TRIAL_FILE = "trial.json"
STATUSES = ("running", "finished", "stopped", "failed")


def trial_raw(base: dict[str, Any], point: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """The raw config of one trial: `base` with the sampled `point` set, writing to `out_dir` and
    starting afresh (a rerun trial does not pick up an earlier attempt's checkpoint)."""
    raw = copy.deepcopy(base)
    raw.pop("tune", None)
    for name, value in point.items():
        set_field(raw, name, value)
    set_field(raw, "train.out_dir", str(out_dir))
    set_field(raw, "checkpoint.resume", "none")
    return raw


def processes(cfg: Config, nproc: int = 0) -> int:
    """The processes a trial of `cfg` runs on: `nproc` when given (tune.nproc), else the layout's:
    dp × pp × tp (dp 0 counts as 1), or the parameter servers plus one worker."""
    if nproc:
        return nproc
    p = cfg.parallel
    if p.ps.servers:
        return p.ps.servers + 1
    return max(p.dp, 1) * p.pp * p.tp


def uses_gpus(cfg: Config, cluster_has_gpus: bool) -> bool:
    """Whether a trial of `cfg` asks Ray for GPUs (Ray hides them from trials that do not)."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and cluster_has_gpus)


@dataclass
class TrialRecord:
    """What `trial.json` holds."""

    trial_id: str
    point: dict[str, Any]
    nproc: int
    status: str = "running"
    wall_s: float = 0.0
    error: str = ""
    max_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: str | Path) -> None:
        path = Path(folder) / TRIAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TRIAL_FILE}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=str))
        os.replace(tmp, path)  # a reader never sees half a record

    @classmethod
    def read(cls, folder: str | Path) -> TrialRecord | None:
        path = Path(folder) / TRIAL_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


def held_out_curve(folder: str | Path) -> list[tuple[int, float]]:
    """(step, held-out loss) of the run in `folder`, from its metrics.jsonl, step 0 included."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    curve = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a run that was killed
        if isinstance(record, dict) and "val_loss" in record and isinstance(record.get("step"), int):
            curve[record["step"]] = float(record["val_loss"])
    return sorted(curve.items())

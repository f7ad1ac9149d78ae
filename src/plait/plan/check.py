"""Honest error: a finished run's measured step time next to the planner's prediction for it."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.errors import PlanError
from plait.plan.cost import Candidate, Estimate, estimate
from plait.plan.hardware import Cluster
from plait.plan.shapes import shape_from_config


@dataclass
class RunCheck:
    run_dir: str
    world: int
    measured_step_s: float
    steps: int
    estimate: Estimate

    @property
    def error(self) -> float:
        """(predicted − measured) / measured."""
        return (self.estimate.step_s - self.measured_step_s) / self.measured_step_s

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "world": self.world, "measured_step_s": self.measured_step_s,
                "predicted_step_s": self.estimate.step_s, "error": self.error,
                "steps_measured": self.steps, "layout": self.estimate.as_dict()}


def run_config(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(config as nested dicts, mesh sizes) saved in the run's newest valid checkpoint."""
    import torch

    # Checkpoints are `checkpoints/step_NNNNNNNN/` folders; a complete one has its manifest
    # (plait.train.checkpoint) and a state.pt holding the run's config and mesh sizes.
    done = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*")
                  if (p / "manifest.json").is_file() and (p / "state.pt").is_file())
    if not done:
        raise PlanError(f"{str(run_dir)!r} has no complete checkpoint to read the run's config from; "
                        "pass the config with --model CONFIG")
    state = torch.load(done[-1] / "state.pt", map_location="cpu", weights_only=True)
    return state["config"], dict(state["mesh"])


def measured_step_time(run_dir: str | Path) -> tuple[float, int]:
    """Median `step_time_s` of the run's metrics, the first logged step (warm-up) left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlanError(f"{str(path)!r} does not exist; --check takes a run folder (train.out_dir)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [(r["step"], r["step_time_s"]) for r in records if "step_time_s" in r]
    if times and times[0][0] <= 1 and len(times) > 1:
        times = times[1:]
    if not times:
        raise PlanError(f"{str(path)!r} holds no step times (train.log_interval too large?)")
    return statistics.median(t for _, t in times), len(times)


def candidate_of(raw: dict[str, Any], mesh: dict[str, int]) -> tuple[Candidate, int]:
    """The run's layout and global batch (sequences per step)."""
    t, p = raw["train"], raw["parallel"]
    dp, pp, tp = mesh["dp"], mesh["pp"], mesh["tp"]
    per_replica = t["micro_batch_size"] * t["grad_accum"]
    m = (p.get("microbatches") or t["grad_accum"]) if pp > 1 else t["grad_accum"]
    if per_replica % m:
        raise PlanError(f"parallel.microbatches={m} does not divide the {per_replica} sequences per replica")
    cand = Candidate(dp, pp, tp, p.get("zero", 0), per_replica // m, p.get("schedule", "1f1b"),
                     p.get("virtual_stages", 1), p.get("recompute", "none"),
                     bool(p.get("sequence_parallel", False)), p.get("partition", "params"))
    return cand, per_replica * dp


def check_run(run_dir: str | Path, cluster: Cluster, raw: dict[str, Any] | None = None,
              mesh: dict[str, int] | None = None) -> RunCheck:
    """Predict the run's layout on `cluster` and compare with its measured step time."""
    if raw is None or mesh is None:
        saved_raw, saved_mesh = run_config(run_dir)
        raw, mesh = raw or saved_raw, mesh or saved_mesh
    from plait.config import Config

    cfg = Config.from_dict(raw)
    shape = shape_from_config(cfg.model, name=str(run_dir))
    cand, batch = candidate_of(raw, mesh)
    est = estimate(shape, cluster, cand, batch)
    measured, n = measured_step_time(run_dir)
    return RunCheck(str(run_dir), cand.dp * cand.pp * cand.tp, measured, n, est)

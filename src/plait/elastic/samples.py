"""The sample ids each optimizer step trained on, as the ranks really drew them.

With `elastic.log_samples`, every rank sends the indices it drew for a step to rank 0, which
appends one JSON line to out_dir/samples.jsonl: {"step": s, "draws": [{"epoch": e, "ids": [...]}]}.
A resumed run drops the lines written after its checkpoint (as metrics.jsonl does), so after any
number of restarts each step appears once, and reading the file shows whether an epoch's samples
were each trained on exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.train.metrics import drop_after

FILE = "samples.jsonl"


class SampleLog:
    """Collects one step's draws on every rank; rank 0 writes them."""

    def __init__(self, out_dir: str | Path, mesh, resumed_step: int | None, fresh: bool):
        self.mesh = mesh
        self.path = Path(out_dir) / FILE
        self._draws: list[tuple[int, list[int]]] = []
        if mesh.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.write_text("")
            elif resumed_step is not None:
                drop_after(self.path, resumed_step)

    def draw(self, epoch: int, ids: list[int]) -> None:
        """One draw of this rank (call right after the sampler handed out `ids`)."""
        self._draws.append((epoch, list(ids)))

    def end_step(self, step: int) -> None:
        """Gather the step's draws on rank 0 (collective over the world) and write them."""
        mine = (self.mesh.coords, self._draws)
        self._draws = []
        if dist.is_initialized() and self.mesh.world_size > 1:
            gathered: list[Any] | None = [None] * self.mesh.world_size if self.mesh.is_main else None
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if not self.mesh.is_main:
            return
        # Ranks of one dp index share their data (tp, pp): keep one of them, in dp order.
        by_dp = {c["dp"]: draws for c, draws in gathered if c["tp"] == 0 and c["pp"] == 0}
        draws = []
        for i in range(len(next(iter(by_dp.values())))):
            epochs = {by_dp[r][i][0] for r in by_dp}
            ids = [x for r in sorted(by_dp) for x in by_dp[r][i][1]]
            draws.append({"epoch": min(epochs), "ids": ids})
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "draws": draws}) + "\n")


def read_samples(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of out_dir/samples.jsonl, in step order."""
    path = Path(out_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

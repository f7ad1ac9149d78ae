"""Per-step metrics: a JSONL file, TensorBoard when installed, and model FLOPs utilisation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s per device (no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
}


def device_peak_flops(device: torch.device) -> float | None:
    """Datasheet peak for this CUDA device, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_device: float | None,
        devices: int) -> float | None:
    """Achieved / peak FLOP/s over all devices, clamped to [0, 1]; None without a known peak."""
    if not peak_flops_per_device:
        return None
    return max(0.0, min(1.0, flops_per_token * tokens_per_s / (peak_flops_per_device * devices)))


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard.

    `resumed_step` says where a resumed run continues: records of later steps, written by the
    run that stopped after that checkpoint, are dropped so that no step appears twice (the
    TensorBoard mirror purges them too). `fresh` begins a new file (a run from step 0).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resumed_step: int | None = None,
                 fresh: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        elif resumed_step is not None:
            drop_after(self.path, resumed_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resumed_step is None else resumed_step + 1
            self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=purge)
        except Exception:  # tensorboard is optional
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def drop_after(path: str | Path, step: int) -> int:
    """Remove the records of `path` (JSONL) whose "step" is beyond `step`; returns how many.

    The file is rewritten through a temporary file and renamed, so a crash leaves either the old
    or the new version. Lines that are not JSON objects (a torn last line) go too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info("%s: dropped %d records after step %d (written before the resumed checkpoint's "
                 "run stopped)", path, dropped, step)
    return dropped


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

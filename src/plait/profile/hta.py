"""Holistic Trace Analysis for GPU traces: temporal and communication/computation breakdowns.

HTA (the HolisticTraceAnalysis package, optional) reads the GPU kernels of torch.profiler traces:
idle, compute and non-compute (communication, memory) time per rank, and how much communication
kernels overlap compute kernels. CPU (Gloo) traces have no kernels: for them plait's own breakdown
(plait.profile.trace) is the analysis, and this module says why HTA was not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class HtaResult:
    """HTA's tables as records, or the reason it did not run."""

    temporal: list[dict[str, Any]] = field(default_factory=list)
    overlap: list[dict[str, Any]] = field(default_factory=list)
    skipped: str = ""


def _records(frame: Any) -> list[dict[str, Any]]:
    if frame is None:
        return []
    frame = frame.reset_index() if "rank" not in getattr(frame, "columns", []) else frame
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def hta_breakdown(trace_files: dict[int, Path], gpu: bool) -> HtaResult:
    """Run HTA over `trace_files` (rank -> trace) when they are GPU traces and HTA is installed."""
    if not gpu:
        return HtaResult(skipped="CPU traces (no GPU kernels): HTA analyses GPU kernels, so plait's "
                                 "own breakdown of the training thread is used")
    try:
        from hta.trace_analysis import TraceAnalysis
    except ImportError:
        return HtaResult(skipped="GPU traces, but Holistic Trace Analysis is not installed "
                                 "(pip install HolisticTraceAnalysis) for kernel-level breakdowns")
    folder = next(iter(trace_files.values())).parent
    try:
        analysis = TraceAnalysis(trace_files={r: str(p) for r, p in trace_files.items()},
                                 trace_dir=str(folder))
        temporal = analysis.get_temporal_breakdown(visualize=False)
        overlap = analysis.get_comm_comp_overlap(visualize=False)
    except Exception as exc:  # HTA's own parser: report, do not fail the whole report
        log.warning("Holistic Trace Analysis failed on %s: %s", folder, exc)
        return HtaResult(skipped=f"Holistic Trace Analysis failed: {type(exc).__name__}: {exc}")
    return HtaResult(temporal=_records(temporal), overlap=_records(overlap))

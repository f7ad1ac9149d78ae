"""Shared benchmark plumbing: machine description, medians, JSON output, tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    info.update(_cpu())
    return info


def _cpu() -> dict[str, Any]:
    """The host CPU's model and widest x86 vector extension (Linux): CPU benchmarks move with both
    (serve_load's ratio was 2.47-2.75 on one 2-core host, 2.74-3.22 on another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    return {"cpu_model": fields.get("model name"), "cpu_vector": vector}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    """Median over steps of ours[i] / peer[i], step i of each side taken in the same round.

    On a machine shared with other jobs the load moves within seconds, and a ratio of two medians
    inherits whatever load each side happened to meet (0.79 to 1.34 over four runs of dp_vs_ddp
    on a shared 2-core machine). Side-by-side steps meet nearly the same load, so each pair's
    ratio cancels it; on a quiet machine the two statistics agree (tp_vs_dtensor: 0.839 paired,
    0.843 of medians).
    """
    if len(ours) != len(peer) or not ours:
        raise ValueError(f"paired_ratio needs two equally long, non-empty step lists; got "
                         f"{len(ours)} and {len(peer)}")
    return median([a / b for a, b in zip(ours, peer)])


def slowest_rank_steps(per_rank: list[list[float]]) -> list[float]:
    """Per-step times of a job: a step ends when its slowest rank does."""
    return [max(ts) for ts in zip(*per_rank)]


def benchmark_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (DESIGN's convention): `--quick` and `--json PATH`.

    Returned unparsed so a benchmark can add options of its own.
    """
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", help="write results here")
    return ap


def round_order(names: list[str] | tuple[str, ...], round_index: int) -> list[str]:
    """The order to run side-by-side variants in one round: as given on even rounds, reversed
    on odd ones (A B, B A, A B, ...). A fixed order would hand whatever the previous variant left
    warm (grown heap, caches) to the same side every time."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def command() -> str:
    return " ".join(["python"] + sys.argv)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "command": command(),
            "load_average_at_end": list(os.getloadavg())}  # 1, 5, 15 min: how shared the machine was
    p.write_text(json.dumps({**payload, **info}, indent=2) + "\n")


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(f"\n{title}\n{line}\n{'-' * len(line)}")
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))

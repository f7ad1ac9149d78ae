"""`plait quantize RUN_DIR --weights int8|int4|bf16 OUT`: a checkpoint with reduced-bit weights.

OUT is a folder that `plait generate` and `plait serve` read as they read any checkpoint. The
command's arguments are declared in `plait.cli`: `plait --help` must not load torch, and importing
any plait.serve module does (through the package's `__init__`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from plait.errors import CheckpointError
from plait.generate import find_checkpoint, load_model
from plait.serve.quantize.linear import check_scheme
from plait.serve.quantize.model import linear_weight_bytes, model_bytes, quantize_model
from plait.serve.quantize.store import save_quantized
from plait.train.checkpoint import STEP_DIR


def run(args: argparse.Namespace) -> int:
    """Quantize `args.checkpoint`'s GPT to `args.weights` and write it to `args.out`."""
    console = Console(stderr=True)
    check_scheme(args.weights, "--weights")
    if Path(args.out).exists():
        raise CheckpointError(f"{args.out!r} already exists; pass a new folder to write the quantized checkpoint to")
    found = find_checkpoint(args.checkpoint)
    for reason in found.skipped:
        console.print(f"skipped: {reason}", markup=False, highlight=False)
    model, cfg = load_model(found)
    before, total_before = linear_weight_bytes(model), model_bytes(model)
    quantize_model(model, args.weights, args.group_size)
    after, total_after = linear_weight_bytes(model), model_bytes(model)
    parts = found.server_parts or [found.path]
    steps = [int(m.group(1)) for p in parts if (m := STEP_DIR.match(p.name))]
    sources = ", ".join(str(p) for p in parts)
    out = save_quantized(model, cfg, args.out, step=max(steps, default=0), source=sources)
    console.print(f"wrote {out} ({args.weights} weights from {sources}): linear weights {before / 1e6:.2f} MB → "
                  f"{after / 1e6:.2f} MB ({after / before:.3f}×), whole model {total_before / 1e6:.2f} MB → "
                  f"{total_after / 1e6:.2f} MB", markup=False, highlight=False)
    return 0

"""`plait export RUN --format executorch OUT.pte`: a GPT or the digits MLP as an ExecuTorch program.

`torch.export` → `to_edge_transform_and_lower` with the XNNPACK partitioner (XNNPACK's CPU
kernels run every op they support; the rest falls back to ExecuTorch's portable kernels) →
a `.pte` file, which ExecuTorch's runtime (C++, or `executorch.runtime` in Python) loads.
The batch axis is dynamic up to MAX_BATCH, and the GPT's sequence axis up to model.block_size.
Each export is run once by ExecuTorch's runtime and compared with PyTorch before it is kept.
Needs the `executorch` extra (`pip install 'plait[executorch]'`), built for the same torch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from plait.config import ModelConfig
from plait.errors import ExportError
from plait.export.common import (INPUT, PARITY_TOL, check_out, example_input, probe_inputs,
                                 quiet_exporter, write_atomic)

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # XNNPACK plans memory for bounded shapes
EXTRA = "pip install 'plait[executorch]'"


@dataclass
class PteExport:
    """What :func:`export_executorch` wrote."""

    path: Path
    arch: str
    bytes: int
    max_abs_diff: float
    checkpoint: Path
    skipped: list[str] = field(default_factory=list)


def _modules() -> tuple[Any, Any]:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(f"--format executorch needs executorch, which is not installed ({exc}); "
                          f"{EXTRA}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def to_pte(model: nn.Module, cfg: ModelConfig, out: str | Path) -> Path:
    """Lower `model` (a plait GPT or MLP in eval mode, on the CPU) to XNNPACK and write `out`."""
    lower, partitioner = _modules()
    name = INPUT[cfg.arch]
    axes: dict[int, Any] = {0: torch.export.Dim("batch", max=MAX_BATCH)}
    if cfg.arch == "gpt":
        axes[1] = torch.export.Dim("seq", max=cfg.block_size)
    model = model.eval()
    with torch.no_grad(), quiet_exporter():
        try:
            program = torch.export.export(model, (example_input(cfg),), dynamic_shapes={name: axes})
            buffer = lower(program, partitioner=[partitioner()]).to_executorch().buffer
        except Exception as exc:  # torch.export and the lowering raise many types
            raise ExportError(f"ExecuTorch could not lower the model.arch={cfg.arch!r} model: "
                              f"{type(exc).__name__}: {exc}") from exc
    return write_atomic(Path(out), lambda tmp: Path(tmp).write_bytes(buffer))


def load_method(path: str | Path) -> Any:
    """The `forward` method of the `.pte` at `path`, ready to `execute([input])`."""
    _modules()
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(Path(path)).load_method("forward")
    except Exception as exc:  # the runtime's own error types
        raise ExportError(f"ExecuTorch cannot load {str(path)!r}: {exc}") from None


def max_difference(model: nn.Module, cfg: ModelConfig, method: Any) -> float:
    """Largest |ExecuTorch − PyTorch| over probe inputs, relative to the logits' scale."""
    worst = 0.0
    with torch.no_grad():
        for x in probe_inputs(cfg):
            ref = model(x)
            got = method.execute([x])[0]
            if got.shape != ref.shape:
                raise ExportError(f"ExecuTorch returned logits of shape {tuple(got.shape)} for an "
                                  f"input of shape {tuple(x.shape)}; PyTorch returns {tuple(ref.shape)}")
            worst = max(worst, (got - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
    return worst


def export_executorch(path: str | Path, out: str | Path) -> PteExport:
    """Export the model of the run or checkpoint folder `path` to the ExecuTorch file `out`
    (must end in `.pte` and not exist), checked against PyTorch (≤ 1e-4 relative) first."""
    out = check_out(out, ".pte", "executorch")
    _modules()
    from plait.export.source import load_source

    src = load_source(path)
    with tempfile.TemporaryDirectory() as tmp:
        staged = to_pte(src.model, src.cfg.model, Path(tmp) / "model.pte")
        diff = max_difference(src.model, src.cfg.model, load_method(staged))
        if diff > PARITY_TOL:
            raise ExportError(f"the ExecuTorch program of {str(src.checkpoint)!r} differs from PyTorch "
                              f"by {diff:.2e} (relative), more than {PARITY_TOL:g}; nothing was written")
        data = staged.read_bytes()
    write_atomic(out, lambda tmp: Path(tmp).write_bytes(data))
    log.info("exported %s (%s) to %s", src.checkpoint, src.arch, out)
    return PteExport(out, src.arch, out.stat().st_size, diff, src.checkpoint, src.skipped)

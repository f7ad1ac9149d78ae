"""What the edge exporters share: model inputs, the parity tolerance, output-path checks and
atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from plait.config import ModelConfig
from plait.errors import ConfigError

INPUT = {"gpt": "idx", "mlp": "x"}  # the graph input's name per model.arch
PARITY_TOL = 1e-4  # max |runtime − PyTorch| on probe inputs, relative to the largest logit (≥ 1)


def example_input(cfg: ModelConfig, batch: int = 2, seq: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """A valid input of the model `cfg` describes: token ids for the GPT (`seq` long, default
    min(block_size, 16)), images with intensities in [0, 1] for the digits MLP."""
    if cfg.arch == "mlp":
        from plait.data.digits import N_FEATURES
        return torch.rand(batch, N_FEATURES, generator=generator)
    t = min(cfg.block_size, 16) if seq is None else seq
    return torch.randint(0, cfg.vocab_size, (batch, t), generator=generator)


def probe_inputs(cfg: ModelConfig) -> list[torch.Tensor]:
    """Inputs of other shapes than the traced one: one sample, several, and for the GPT the
    longest sequence, so a parity check also covers the dynamic axes."""
    g = torch.Generator().manual_seed(0)
    probes = [example_input(cfg, 1, 1, g), example_input(cfg, 3, None, g)]
    if cfg.arch == "gpt":
        probes.append(example_input(cfg, 2, cfg.block_size, g))
    return probes


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch's exporters warn about optional torchvision ops and deprecated pytree types, which
    say nothing about the model being exported: kept out of the user's terminal."""
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        noisy.setLevel(level)


def check_out(out: str | Path, suffix: str, fmt: str) -> Path:
    """`out` as a Path; refused when it exists or lacks the format's file suffix."""
    out = Path(out)
    if out.suffix != suffix:
        raise ConfigError(f"OUT={str(out)!r}: --format {fmt} writes one file, whose name must end in "
                          f"{suffix!r} (e.g. {str(out.with_suffix(suffix))!r})")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"OUT={str(out)!r} exists; choose a new file name (an export never replaces a file)")
    return out


def write_atomic(out: Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file next to `out`, then rename it to `out`: a failed or
    interrupted export never leaves a partial file under the real name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out

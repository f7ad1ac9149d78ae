"""The serving engine's side of quantized layers: its runner calls them, and the row quantum that
keeps batched outputs equal to unbatched ones is checked for them too.

The engine's :class:`~plait.serve.runner.ModelRunner` binds each block's float weights to
`F.linear` once; for a quantized model the blocks' linear steps are rebound here to the layers
themselves (which dequantize, then run the same float32 GEMM, see
:mod:`plait.serve.quantize.linear`). The tied output head stays float32 and is used as before.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.serve.activation import gelu_tanh
from plait.serve.invariance import CANDIDATES, pad_rows
from plait.serve.quantize.linear import QuantizedLinear
from plait.serve.quantize.model import quantize_model, quantized_layers, scheme_of
from plait.serve.runner import ModelRunner, _Layer

log = logging.getLogger(__name__)


def has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def ensure_quantized(model: nn.Module, weights: str | None) -> nn.Module:
    """`model` with `weights` layers (quantized in place when it is float); ConfigError when it
    already holds another format."""
    if weights is None:
        return model
    held = scheme_of(model)
    if held is None:
        return quantize_model(model, weights)
    if held != weights:
        raise ConfigError(f"quantize={weights!r}, but the checkpoint's weights are already {held}: serve it as "
                          f"it is (no quantize), or quantize the float32 checkpoint instead")
    return model


class Scratch:
    """Float32 matrices to dequantize into, one per weight shape, for one engine (which runs its
    steps on one thread at a time, so its layers may share them)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}

    def kernel(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """`layer` as a function of float32 rows: a quantized layer's kernel, or F.linear on a float one."""
        if not isinstance(layer, QuantizedLinear):
            w, b = layer.weight, layer.bias
            return lambda x: F.linear(x, w, b)
        shape = (layer.out_features, layer.in_features)
        if shape not in self.bufs:
            self.bufs[shape] = torch.empty(shape, device=self.device)
        return layer.kernel(self.bufs[shape])


class _QuantizedLayer(_Layer):
    """A block's steps for the runner, through its layers' kernels (bound once, no module calls)."""

    def __init__(self, block: nn.Module, scratch: Scratch):
        super().__init__(block)
        self._qkv_k, self._proj_k = scratch.kernel(block.attn.qkv), scratch.kernel(block.attn.proj)
        self._fc_k, self._mproj_k = scratch.kernel(block.mlp.fc), scratch.kernel(block.mlp.proj)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        return self._qkv_k(x)

    def proj(self, x: torch.Tensor) -> torch.Tensor:
        return self._proj_k(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self._mproj_k(gelu_tanh(self._fc_k(x)))


def bind_quantized_layers(runner: ModelRunner) -> ModelRunner:
    """Make `runner` call its model's quantized layers (see the module's docstring)."""
    scratch = Scratch(runner.device)
    runner.layers = [_QuantizedLayer(b, scratch) for b in runner.model.blocks]
    return runner


@torch.no_grad()
def probe_quantized_row_quantum(model: nn.Module, max_rows: int, candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The smallest quantum q for which every quantized layer shape gives, for products over k·q
    rows, the same rows as a product over more rows (as :func:`plait.serve.invariance.probe_row_quantum`
    checks for float layers); the largest candidate, with a warning, when none does."""
    kinds: dict[tuple, Callable[[torch.Tensor], torch.Tensor]] = {}
    scratch = Scratch(next(model.parameters()).device)
    for _, m in quantized_layers(model):
        kinds.setdefault((type(m), m.out_features, m.in_features), (m, scratch.kernel(m)))
    gen = torch.Generator().manual_seed(0)
    for q in candidates:
        top = pad_rows(max(max_rows, 4 * q), q)
        counts = sorted({c for c in (q, 2 * q, 3 * q, 5 * q, 8 * q, top - q) if 0 < c < top})
        ok = True
        for layer, kernel in kinds.values():
            x = torch.randn(top, layer.in_features, generator=gen).to(scratch.device)
            ref = kernel(x)
            ok &= all(torch.equal(kernel(x[:n]), ref[:n]) for n in counts)
        if ok:
            log.info("row quantum %d: rows of batched quantized products match", q)
            return q
    log.warning("no row quantum in %s gives batch-invariant quantized products on this machine; batched "
                "outputs may differ in the last bits from one-at-a-time ones", candidates)
    return candidates[-1]

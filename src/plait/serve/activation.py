"""GPT-2's tanh GELU for the serving paths, computed the way that is fastest on each device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# 0.5·(1 + tanh(z)) = σ(2z), so GELU_tanh(x) = x·σ(x·(A + B·x²)) with A = 2·√(2/π), B = A·0.044715.
_A = 2.0 * math.sqrt(2.0 / math.pi)
_B = _A * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), for inference only (works in place on a temporary).

    On the CPU it is computed through the sigmoid: torch's tanh GELU kernel takes 3–4 ns per element
    on an AVX2 core, the five vectorized element-wise steps here about 1.6 ns (88×512 rows: 73
    against 163 µs on one thread), and prompt prefill spends a sixth of its time in GELU. Results
    are within 5e-7 of `F.gelu(x, approximate="tanh")`. Every serving path (one process, tensor
    and pipeline parallel, quantized) calls this one function, so they agree bit for bit with each
    other and with `plait generate`; training keeps torch's kernel, whose backward is fused.
    Elsewhere (CUDA) torch's fused kernel is the fast one.
    """
    if x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")
    u = x * x
    return u.mul_(_B).add_(_A).mul_(x).sigmoid_().mul_(x)

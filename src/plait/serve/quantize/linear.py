"""Linear layers whose weights are stored in fewer bits: bf16, int8 per output channel, int4 in groups.

How they compute. Each call dequantizes the weight into a float32 scratch matrix (one per weight
shape, reused by every layer of that shape: per thread for `forward`, per engine for the serving
runner's :meth:`QuantizedLinear.kernel`) and runs torch's float32 GEMM on it; int8 applies its
per-channel scale to the (smaller) output instead. Memory holds the reduced-bit weights plus one
float32 matrix per distinct shape.

Which kernel, measured (`benchmarks/quantize.py`, x86 AVX2, one thread, CPU µs per call of the
demo GPT's 384×128 layer at 4 / 32 rows; float32 F.linear 21 / 53):

* int8 here (dequantize into scratch, GEMM, scale): 26 / 58; into a fresh tensor 28 / 59;
* torch.ops.aten._weight_int8pack_mm: 208 / 1612 with float32 activations (a scalar path on this
  CPU); 24 / 106 with bf16 activations, which also rounds the activations;
* torchao Int8WeightOnlyConfig (eager): 58 / 93;
* int4 here: 62 / 93; torch.ops.aten._weight_int4pack_mm_for_cpu: 399 / 3145 with float32
  activations, 22 / 97 with bf16 ones. The latter is faster at few rows, but rounds activations to
  bf16 and its batch invariance is unchecked: int4 stays on the dequantizing path for now.

In the serving engine this makes int8 about as fast as float32 per token (within a few %), bf16
likewise, int4 1.4-1.6x slower.

Batch invariance: the GEMM runs on a float32 matrix of a fixed shape, as a float32 layer's does,
and the scale, bias and dequantization work element by element, so a row's result does not depend
on the other rows wherever the float32 GEMM's does not; `plait.serve.quantize.runtime` checks that
at engine start for these layers' shapes.

The layers are for inference: they hold no trainable weight (the reduced-bit tensors are buffers).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.errors import ConfigError

SCHEMES = ("int8", "int4", "bf16")
DEFAULT_GROUP_SIZE = 32

_local = threading.local()


def _scratch(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """This thread's reused float32 matrix of `shape` on `device`, to dequantize into."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (shape, device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, device=device)
    return buf


class QuantizedLinear(nn.Module):
    """A linear layer y = x Wᵀ + b with W stored in reduced precision (see the subclasses).

    `weight` holds the stored form (int8, packed int4 in uint8, or bf16) and is not a float
    matrix; :meth:`dequantize` gives W in float32. `bias` stays float32.
    """

    scheme: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight and its scales (the bias, kept in float32, not included)."""
        return sum(b.nbytes for b in self.buffers(recurse=False))

    def dequantize(self) -> torch.Tensor:
        """W as a float32 (out_features, in_features) matrix."""
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device)
        return self._dequantize_into(w)

    def _dequantize_into(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel(self, buf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """This layer as a function of float32 inputs, without autograd, that dequantizes into
        `buf` (a float32 (out_features, in_features) matrix the caller owns and uses from one
        thread at a time). Its tensors are bound once: what the serving runner calls every step."""
        b = self.bias
        return lambda x: F.linear(x, self._dequantize_into(buf), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
            # Autograd must keep the weight it multiplied by: a fresh matrix, not the scratch one.
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        return self.kernel(_scratch((self.out_features, self.in_features), x.device))(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BF16Linear(QuantizedLinear):
    """W rounded to bfloat16 (half the bytes of float32), computed in float32."""

    scheme = "bf16"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "BF16Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        q.weight.copy_(linear.weight.detach())
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def _dequantize_into(self, w: torch.Tensor) -> torch.Tensor:
        return w.copy_(self.weight)

    def kernel(self, buf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        w, b = self.weight, self.bias
        return lambda x: F.linear(x, buf.copy_(w), b)


class Int8Linear(QuantizedLinear):
    """W ≈ q · s: q in int8 [-127, 127], one float32 scale s per output channel (row of W).

    Symmetric, round to nearest; s = max |row| / 127. About a quarter of float32's bytes.
    """

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q.weight.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def _dequantize_into(self, w: torch.Tensor) -> torch.Tensor:
        return w.copy_(self.weight).mul_(self.scale[:, None])

    def kernel(self, buf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        # (x qᵀ) · s: the scale multiplies the output's rows × out values, not the whole weight.
        q, s, b = self.weight, self.scale, self.bias
        if b is None:
            return lambda x: F.linear(x, buf.copy_(q)).mul_(s)
        return lambda x: torch.addcmul(b, F.linear(x, buf.copy_(q)), s)


class Int4Linear(QuantizedLinear):
    """W ≈ q · s + z per group of `group_size` consecutive inputs of a row: q in [0, 15], packed
    two to a byte, and a float32 scale s and offset z per group (asymmetric, round to nearest,
    each group's range shrunk where that lowers its squared error).

    Packing: byte j of a row holds column j in its low nibble and column j + in_features/2 in its
    high nibble, so unpacking is two whole-slice copies.
    """

    scheme = "int4"
    SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # fractions of a group's range tried when quantizing

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 group_size: int = DEFAULT_GROUP_SIZE):
        check_group_size(group_size, in_features)
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, 1, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, 1, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int4Linear":
        g = group_size or DEFAULT_GROUP_SIZE
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device, g)
        o, i = linear.out_features, linear.in_features
        w = linear.weight.detach().float().reshape(o, i // g, g)
        lo, hi = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
        best_err = torch.full_like(lo, float("inf"))
        best_s, best_z = torch.ones_like(lo), torch.zeros_like(lo)
        mid = (lo + hi) / 2
        for f in cls.SHRINK:
            a, b = mid + (lo - mid) * f, mid + (hi - mid) * f
            s = ((b - a) / 15).clamp(min=torch.finfo(torch.float32).tiny)
            levels = torch.round((w - a) / s).clamp_(0, 15)
            err = ((levels * s + a - w) ** 2).sum(dim=2, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, a, best_z)
        levels = torch.round((w - best_z) / best_s).clamp_(0, 15).to(torch.uint8).reshape(o, i)
        half = i // 2
        q.weight.copy_(levels[:, :half] | (levels[:, half:] << 4))
        q.scale.copy_(best_s)
        q.zero.copy_(best_z)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def _dequantize_into(self, w: torch.Tensor) -> torch.Tensor:
        half = self.in_features // 2
        w[:, :half].copy_(self.weight & 15)
        w[:, half:].copy_(self.weight >> 4)
        w.view(self.out_features, -1, self.group_size).mul_(self.scale).add_(self.zero)
        return w

    def kernel(self, buf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        half = self.in_features // 2
        q, s, z, b = self.weight, self.scale, self.zero, self.bias
        lo, hi, groups = buf[:, :half], buf[:, half:], buf.view(self.out_features, -1, self.group_size)

        def run(x: torch.Tensor) -> torch.Tensor:
            lo.copy_(q & 15)
            hi.copy_(q >> 4)
            groups.mul_(s).add_(z)
            return F.linear(x, buf, b)
        return run

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


LAYERS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "bf16": BF16Linear}


def check_scheme(weights: str | None, field: str = "weights") -> str:
    """`weights` if it names a supported scheme, else ConfigError naming `field` and the valid ones."""
    if weights not in SCHEMES:
        raise ConfigError(f"{field}={weights!r} is not a supported weight format; valid: {', '.join(SCHEMES)} "
                          "(bf16: 16-bit floats, int8: per output channel, int4: in groups)")
    return weights


def check_group_size(group_size: int, in_features: int | None = None, where: str = "") -> None:
    """int4 groups must be whole, even runs of a row's inputs."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ConfigError(f"group_size={group_size!r} must be an even integer ≥ 2 (e.g. 32, 64, 128)")
    if in_features is not None and in_features % group_size:
        valid = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ConfigError(f"group_size={group_size} does not divide the {in_features} inputs of "
                          f"{where or 'a linear layer'}; valid group sizes here include {valid or [2]}")


def quantize_linear(linear: nn.Linear, weights: str, group_size: int | None = None) -> QuantizedLinear:
    """The reduced-bit layer for `linear` under scheme `weights` ("int8", "int4" or "bf16")."""
    return LAYERS[check_scheme(weights)].from_linear(linear, group_size)


def empty_like_linear(linear: nn.Linear, weights: str, group_size: int | None = None) -> QuantizedLinear:
    """An uninitialised reduced-bit layer of `linear`'s shape (to load a saved state into)."""
    cls = LAYERS[check_scheme(weights)]
    args = (linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
    return cls(*args, group_size=group_size or DEFAULT_GROUP_SIZE) if cls is Int4Linear else cls(*args)

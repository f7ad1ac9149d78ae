"""Swapping a model's linear layers for reduced-bit ones, and measuring what that saves.

What is quantized: every `nn.Linear` whose weight no other module shares. In the GPT that is each
block's qkv, attention projection and MLP layers; the output head is tied to the token embedding
(one matrix used both to look tokens up and to score them) and stays float32, as do the position
embedding and LayerNorms. In the digits MLP it is every layer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from plait.errors import ConfigError
from plait.serve.quantize.linear import (DEFAULT_GROUP_SIZE, QuantizedLinear, check_group_size, check_scheme,
                                         empty_like_linear, quantize_linear)

log = logging.getLogger(__name__)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of each `nn.Linear` whose weight is its own (tied weights are left out)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and uses.get(id(m.weight), 0) == 1]


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def scheme_of(model: nn.Module) -> str | None:
    """The weight format of `model`'s quantized layers ("int8", "int4", "bf16"), or None."""
    schemes = {m.scheme for _, m in quantized_layers(model)}
    if len(schemes) > 1:
        raise ConfigError(f"the model mixes weight formats {sorted(schemes)}; plait writes one per model")
    return schemes.pop() if schemes else None


def group_size_of(model: nn.Module) -> int | None:
    sizes = {getattr(m, "group_size", None) for _, m in quantized_layers(model)} - {None}
    return sizes.pop() if len(sizes) == 1 else None


def _swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _check(model: nn.Module, weights: str, group_size: int) -> list[tuple[str, nn.Linear]]:
    check_scheme(weights)
    done = scheme_of(model)
    if done is not None:
        raise ConfigError(f"the model's weights are already {done}; quantizing them again to {weights} would "
                          f"compound the rounding: start from the float32 checkpoint")
    layers = quantizable_linears(model)
    if weights == "int4":
        check_group_size(group_size)
        for name, m in layers:
            check_group_size(group_size, m.in_features, name)
    return layers


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace `model`'s own linear layers (see the module's docstring) by `weights` ones, in place.

    `weights`: "int8" (per output channel), "int4" (groups of `group_size` inputs) or "bf16".
    Returns `model`, in eval mode. Raises ConfigError for an unknown format, a group size that
    does not divide a layer's inputs, or a model that is quantized already.
    """
    layers = _check(model, weights, group_size)
    for name, m in layers:
        _swap(model, name, quantize_linear(m, weights, group_size))
    log.info("quantized %d linear layers to %s", len(layers), weights)
    return model.eval()


def prepare_empty(model: nn.Module, weights: str, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Give `model` uninitialised `weights` layers where :func:`quantize_model` would put them, so a
    saved quantized state dict loads into it."""
    for name, m in _check(model, weights, group_size):
        _swap(model, name, empty_like_linear(m, weights, group_size))
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (with scales) of the layers :func:`quantize_model` swaps, in their
    present form: float for `nn.Linear`, the stored form for quantized ones. Biases excluded."""
    total = sum(m.weight_nbytes for _, m in quantized_layers(model))
    return total + sum(m.weight.nbytes for _, m in quantizable_linears(model))


def model_bytes(model: nn.Module) -> int:
    """Bytes of everything the model holds (parameters and buffers, shared tensors once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.nbytes
    return sum(seen.values())

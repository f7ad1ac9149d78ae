"""Reduced-bit linear layers and swapping them into models: error bounds, bytes, what is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from plait.errors import ConfigError
from plait.models import GPT, MLPClassifier
from plait.serve.quantize.linear import BF16Linear, Int4Linear, Int8Linear, QuantizedLinear
from plait.serve.quantize.model import (linear_weight_bytes, model_bytes, quantizable_linears, quantize_model,
                                        scheme_of)
from tests.serve.support import tiny_gpt_config


def _linear(o: int = 96, i: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(i, o)
    nn.init.normal_(lin.weight, std=0.05)
    nn.init.normal_(lin.bias, std=0.05)
    return lin


@pytest.mark.parametrize("cls,bound,out_err", [(Int8Linear, 0.5 / 127, 0.01), (Int4Linear, None, 0.1),
                                               (BF16Linear, 2 ** -8, 0.005)])
def test_layer_reconstructs_weight_and_computes_with_it(cls, bound, out_err):
    lin = _linear()
    q = cls.from_linear(lin)
    w, wq = lin.weight.detach(), q.dequantize()
    if cls is Int8Linear:  # round to nearest: within half a step of each row's scale
        assert ((wq - w).abs() <= w.abs().amax(1, keepdim=True) * bound * 1.0001).all()
    elif cls is BF16Linear:
        assert ((wq - w).abs() <= w.abs() * bound).all()
    else:  # 16 levels per group of 32 over a range shrunk to no less than 3/4 of the group's
        groups = w.reshape(96, 2, 32)
        span = groups.amax(2, keepdim=True) - groups.amin(2, keepdim=True)
        assert ((wq.reshape(96, 2, 32) - groups).abs() <= 0.15 * span * 1.0001).all()
        assert (wq - w).norm() / w.norm() < 0.1
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(x, wq, lin.bias), rtol=1e-5, atol=1e-6)
        assert (q(x) - lin(x)).norm() / lin(x).norm() < out_err


def test_int4_packs_two_levels_per_byte_and_bytes_shrink():
    lin = _linear(128, 128)
    q8, q4, q16 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32), BF16Linear.from_linear(lin)
    fp = lin.weight.nbytes
    assert q4.weight.shape == (128, 64) and q4.weight.dtype == torch.uint8
    assert q8.weight_nbytes == 128 * 128 + 128 * 4  # int8 levels + one float32 scale per output channel
    assert q4.weight_nbytes == 128 * 64 + 2 * 128 * 4 * 4  # nibbles + scale and offset per group of 32
    assert q16.weight_nbytes == fp // 2
    assert q8.weight_nbytes / fp < 0.27 and q4.weight_nbytes / fp < 0.2


def test_gradients_flow_to_the_input_without_touching_the_scratch_matrix():
    lin = _linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, -1), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_gpt_quantizes_its_block_linears_and_keeps_the_tied_head():
    torch.manual_seed(0)
    model = GPT(tiny_gpt_config()).eval()
    ref = copy.deepcopy(model)
    names = [n for n, _ in quantizable_linears(model)]
    assert "head" not in names and len(names) == 4 * model.cfg.n_layer  # qkv, proj, fc, proj per block
    fp_bytes, fp_total = linear_weight_bytes(model), model_bytes(model)
    quantize_model(model, "int8")
    assert scheme_of(model) == "int8"
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear) and isinstance(model.blocks[1].mlp.proj, Int8Linear)
    assert type(model.head) is nn.Linear and model.head.weight is model.tok_emb.weight
    assert linear_weight_bytes(model) / fp_bytes < 0.27
    assert model_bytes(model) < 0.5 * fp_total
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        a, b = ref(idx), model(idx)
    assert (a - b).abs().max() < 0.02 * a.abs().max()


def test_mlp_quantizes_every_layer():
    torch.manual_seed(0)
    model = MLPClassifier(64, 64, 2, 10).eval()
    x = torch.rand(8, 64)
    with torch.no_grad():
        ref = model(x)
        quantize_model(model, "int4", group_size=32)
        out = model(x)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 3
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_bad_formats_and_group_sizes_are_refused_by_name():
    model = GPT(tiny_gpt_config())
    with pytest.raises(ConfigError, match=r"weights='int3' is not a supported weight format; valid: int8, int4, bf16"):
        quantize_model(model, "int3")
    with pytest.raises(ConfigError, match="group_size=48 does not divide the 64 inputs of blocks.0.attn.qkv"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ConfigError, match="group_size=7 must be an even integer"):
        quantize_model(model, "int4", group_size=7)
    assert scheme_of(model) is None  # nothing swapped by a refused call
    quantize_model(model, "int8")
    with pytest.raises(ConfigError, match="already int8"):
        quantize_model(model, "int4")

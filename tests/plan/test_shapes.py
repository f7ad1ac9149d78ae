"""The planner's closed forms agree with the GPT it plans for."""

from __future__ import annotations

import pytest

from plait.errors import PlanError
from plait.models import GPT
from plait.plan.shapes import MODELS, named_model, shape_from_config
from tests.helpers import tiny_model_config


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"n_layer": 3, "n_head": 4, "n_embd": 48, "block_size": 32,
                                                                "vocab_size": 300}])
def test_counts_match_the_built_model(kw):
    cfg = tiny_model_config(**kw)
    gpt, shape = GPT(cfg), shape_from_config(cfg)
    assert shape.num_params() == gpt.num_params()
    assert shape.block_params() == sum(p.numel() for p in gpt.blocks[0].parameters())
    assert shape.flops_per_token() == pytest.approx(gpt.flops_per_token(cfg.block_size))


def test_hardware_flops_are_narayanan_eq_3():
    """96·B·s·l·h²·(1 + s/6h + V/16lh) per iteration with full recomputation (their eq. 3)."""
    for name in ("gpt-1.7b", "gpt-175b", "gpt-1t"):
        m = MODELS[name]
        s, h, l, v = m.seq, m.n_embd, m.n_layer, m.vocab
        eq3 = 96 * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h)) / s  # per token
        assert m.hardware_flops_per_token("full") == pytest.approx(eq3, rel=0.005)
        assert m.hardware_flops_per_token("none") == pytest.approx(m.flops_per_token())
        assert m.flops_per_token() < m.hardware_flops_per_token("selective") < m.hardware_flops_per_token("full")


def test_named_models():
    assert named_model("GPT-175B").num_params() == pytest.approx(175e9, rel=0.02)
    assert named_model("gpt-125m").num_params() == pytest.approx(125e6, rel=0.1)
    with pytest.raises(PlanError, match="valid: gpt-125m, gpt-350m"):
        named_model("gpt-9")
    with pytest.raises(PlanError, match="models the GPT only"):
        shape_from_config(tiny_model_config(arch="mlp"))

import math

import torch
import torch.nn.functional as F

from plait.serve.activation import gelu_tanh


def test_gelu_tanh_is_torchs_tanh_gelu_within_rounding():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4
    assert (gelu_tanh(x.clone()) - F.gelu(x, approximate="tanh")).abs().max().item() <= 1e-6


def test_gelu_tanh_at_the_extremes_as_torchs():
    x = torch.tensor([-1e30, -100.0, -0.0, 0.0, 100.0, 1e30, float("inf"), float("-inf"), float("nan")])
    got, want = gelu_tanh(x.clone()), F.gelu(x, approximate="tanh")
    assert got[:7].tolist() == want[:7].tolist()  # -1e30 and -100 give 0 (either sign), 1e30 itself
    assert math.isnan(got[7].item()) and math.isnan(want[7].item())  # -inf·0, in torch's kernel too
    assert math.isnan(got[8].item())


def test_gelu_tanh_leaves_its_input_alone():
    x = torch.randn(8, 16)
    before = x.clone()
    gelu_tanh(x)
    assert torch.equal(x, before)

"""The fused head + cross-entropy: the plain loss's value and gradients, chunk by chunk, and a
GPT trained with it equals one trained with the plain loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plait.models.fused_loss import linear_cross_entropy
from plait.testing.memory import track_allocations


def _plain(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), y)


def _grads(loss_fn, h, w, y):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = loss_fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 64])  # 37 rows: chunks that do not divide them too
def test_value_and_gradients_equal_the_plain_loss(chunk_rows):
    torch.manual_seed(0)
    h, w, y = torch.randn(37, 16), torch.randn(300, 16) * 0.3, torch.randint(0, 300, (37,))
    ref = _grads(_plain, h, w, y)
    out = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows), h, w, y)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_follows_the_plain_loss():
    torch.manual_seed(0)
    h, w, y = torch.randn(64, 32), torch.randn(256, 32) * 0.2, torch.randint(0, 256, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, y)
        out = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, 16), h, w, y)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype  # gradients in the inputs' dtypes, as autocast's casts give
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_a_chunk_at_a_time_allocates_less_than_whole_logits():
    torch.manual_seed(0)
    h, w, y = torch.randn(512, 32), torch.randn(4096, 32), torch.randint(0, 4096, (512,))
    peaks = {}
    for name, fn in (("plain", _plain), ("fused", lambda a, b, c: linear_cross_entropy(a, b, c, 64))):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with track_allocations() as trace:
            fn(hh, ww, y).backward()
        peaks[name] = trace.peak
    logits_bytes = 512 * 4096 * 4
    assert peaks["plain"] > 2 * logits_bytes  # logits, their log-softmax, its gradient
    assert peaks["fused"] < logits_bytes / 2  # one 64-row chunk's logits and the two gradients


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_rows=0 must be ≥ 1"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(8, 4), torch.tensor([0, 1]), 0)


@pytest.mark.parametrize("sections", [
    {},
    {"train": {"compile": True, "compile_backend": "aot_eager"}},  # eager inside the compiled model
])
def test_training_with_fused_loss_equals_the_plain_loss(tmp_path, sections):
    from tests.helpers import max_abs_diff, tiny_run_config
    from tests.train.test_trainer import train_and_report

    plain = train_and_report(tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "plain")}).to_dict(),
                             world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"loss_chunk_rows": 24, "eval_interval": 5,
                                           "out_dir": str(tmp_path / "fused"), **sections.get("train", {})})
    fused = train_and_report(cfg.to_dict(), world_mesh=False)
    assert fused["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert fused["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-4)
    assert max_abs_diff(fused["params"], plain["params"]) < 1e-5
    assert fused["val"] is not None  # the held-out loss goes the same way


def test_data_parallel_training_with_fused_loss_matches_one_process(pools, tmp_path):
    from tests.helpers import max_abs_diff, tiny_run_config
    from tests.train.test_trainer import train_and_report

    ref = train_and_report(tiny_run_config(tmp_path, train={"micro_batch_size": 8}).to_dict(), world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"micro_batch_size": 4, "loss_chunk_rows": 16,
                                           "out_dir": str(tmp_path / "dp")}, parallel={"bucket_mb": 0.01})
    for r in pools(2).run(train_and_report, cfg.to_dict()):
        assert max_abs_diff(r["params"], ref["params"]) < 1e-5
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)

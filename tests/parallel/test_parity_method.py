"""Why every parity test compares gradient norms, not only parameters and losses.

AdamW divides each update by the root of its second moment, so a gradient off by a constant
factor (a reducer that sums instead of averaging over dp=4) moves the weights almost exactly as
the right one does, and gradient clipping hides the rest. The gradient-norm history does not.
"""

from __future__ import annotations

import pytest

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.mesh import ParallelMesh
from plait.train.trainer import Trainer
from tests.helpers import max_abs_diff, tiny_run_config


def _run(cfg: Config, scale: float) -> dict:
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, ParallelMesh.single(), train, val)
    forward_backward = trainer.model.forward_backward

    def scaled(*args, **kwargs):  # every gradient off by `scale`, as a broken reducer would leave it
        loss = forward_backward(*args, **kwargs)
        for p in trainer.model.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        return loss

    trainer.model.forward_backward = scaled
    history = trainer.fit()["history"]
    return {"params": {k: v.clone() for k, v in trainer.model.module.state_dict().items()},
            "losses": [h["loss"] for h in history], "grad_norms": [h["grad_norm"] for h in history]}


def test_a_gradient_off_by_four_is_invisible_in_parameters_but_not_in_grad_norms(tmp_path):
    ref = _run(tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "a")}), scale=1.0)
    off = _run(tiny_run_config(tmp_path, train={"out_dir": str(tmp_path / "b")}), scale=4.0)
    assert max_abs_diff(off["params"], ref["params"]) < 1e-5  # what parity tests used to compare
    assert off["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    assert off["grad_norms"] != pytest.approx(ref["grad_norms"], rel=1e-5)  # what they compare now
    assert off["grad_norms"][0] == pytest.approx(4 * ref["grad_norms"][0], rel=1e-5)

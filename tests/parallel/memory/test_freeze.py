"""Layer freezing: the frozen part gets no gradient work and no communication; dp parity holds."""

from __future__ import annotations

import pytest
import torch

from plait.config import Config
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.parallel.data_parallel.reducer import GradientReducer
from plait.parallel.memory.freeze import freeze_blocks
from tests.helpers import max_abs_diff, tiny_model_config, tiny_run_config
from tests.train.test_trainer import train_and_report


def test_freeze_first_block_and_position_embedding():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    frozen = freeze_blocks(model, 1)
    assert set(frozen) == {n for n, _ in model.named_parameters() if n.startswith("blocks.0.")} | {"pos_emb.weight"}
    assert model.tok_emb.weight.requires_grad  # tied to the head, which keeps training
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    x = torch.randint(0, 256, (2, 16))
    model(x, x)[1].backward()
    assert seen == [False]  # backward never enters the frozen block
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen), name


def _reducer_bytes(k: int) -> int:
    mesh = ParallelMesh.build()
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    freeze_blocks(model, k)
    reducer = GradientReducer(model, mesh.dp_group)
    reducer.remove()
    return reducer.bytes_per_step


def test_frozen_blocks_are_not_communicated(pools):
    full, one, two = (pools(2).run(_reducer_bytes, k)[0] for k in (0, 1, 2))
    block = sum(p.numel() for p in GPT(tiny_model_config()).blocks[0].parameters()) * 4
    assert full - one > block  # block 0 and the position table leave the buckets
    assert one - two == pytest.approx(block, rel=0.01)


def test_dp_training_with_frozen_blocks_matches_one_process(pools, tmp_path):
    ref_cfg = tiny_run_config(tmp_path, train={"micro_batch_size": 8, "freeze_blocks": 1})
    ref = train_and_report(ref_cfg.to_dict(), world_mesh=False)
    cfg = tiny_run_config(tmp_path, train={"micro_batch_size": 4, "freeze_blocks": 1,
                                           "out_dir": str(tmp_path / "dp")}, parallel={"zero": 2})
    out = pools(2).run(train_and_report, cfg.to_dict())[0]
    assert max_abs_diff(out["params"], ref["params"]) < 1e-5
    assert out["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    torch.manual_seed(Config().train.seed)
    init = GPT(tiny_model_config()).state_dict()
    for name in ("blocks.0.attn.qkv.weight", "pos_emb.weight"):
        assert torch.equal(out["params"][name], init[name]), name
    assert not torch.equal(out["params"]["blocks.1.attn.qkv.weight"], init["blocks.1.attn.qkv.weight"])


def test_freeze_more_blocks_than_the_model_has(tmp_path):
    from plait.config import validate
    cfg = tiny_run_config(tmp_path, train={"freeze_blocks": 3})
    with pytest.raises(ConfigError, match=r"train.freeze_blocks=3 must be in \[0, model.n_layer=2\]"):
        validate(cfg)
    with pytest.raises(ConfigError, match="freeze_blocks=3"):
        freeze_blocks(GPT(tiny_model_config()), 3)
    with pytest.raises(ConfigError, match=r"train.freeze_blocks=1 is not supported with parallel.pp=2"):
        validate(tiny_run_config(tmp_path, train={"freeze_blocks": 1}, parallel={"pp": 2}))

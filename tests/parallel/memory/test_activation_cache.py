"""Frozen layers with cached activations: the same losses as recomputing the frozen prefix, over
several epochs (entries reused), in memory and spilled to disk, under the Trainer and ZeRO-3."""

from __future__ import annotations

import pytest
import torch

from plait.config import validate
from plait.data.dataset import load_token_splits
from plait.data.sampler import ElasticSampler
from plait.errors import ConfigError
from plait.mesh import ParallelMesh
from plait.models import GPT
from plait.parallel.memory.activation_cache import ActivationCache, cache_frozen_prefix, row_keys
from plait.parallel.memory.freeze import freeze_blocks
from plait.config import Config
from plait.train.trainer import Trainer
from tests.helpers import tiny_model_config, tiny_run_config, tiny_text


def test_cache_round_trips_in_memory_and_on_disk(tmp_path):
    cache = ActivationCache(limit_mb=100 / 2**20, spill_dir=tmp_path / "spill")  # 100 bytes in memory
    small = torch.arange(20, dtype=torch.float32).view(4, 5)  # 80 bytes: fits
    big = torch.randn(3, 7)  # 84 bytes: spills
    half = torch.randn(4, 3).to(torch.bfloat16)  # 24 bytes: spills too
    for key, value in ((b"a", small), (b"b", big), (b"c", half)):
        cache.put(key, value)
    assert cache.stats()["memory_bytes"] == 80 and cache.stats()["disk_bytes"] == 84 + 24
    for key, value in ((b"a", small), (b"b", big), (b"c", half)):
        got = cache.get(key)
        assert got.dtype == value.dtype and torch.equal(got, value)
    assert cache.get(b"zz") is None and len(cache) == 3
    folder = cache.spill_path
    assert folder is not None and folder.parent == tmp_path / "spill" and folder.is_dir()
    cache.close()
    assert not folder.exists() and len(cache) == 0


def test_row_keys_follow_content():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 2, 3]])
    keys = row_keys(a)
    assert keys[0] == keys[2] != keys[1]
    assert row_keys(a[:, :2])[0] != keys[0]  # the length is part of the content


def _train(cache: ActivationCache | None, steps: int = 9) -> tuple[list[float], dict, list[float]]:
    """9 steps over 12 samples in batches of 4: three epochs, so entries are read back twice."""
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=3))
    freeze_blocks(model, 2)
    cache_frozen_prefix(model, 2, cache)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 256, (12, 17), generator=torch.Generator().manual_seed(1))
    sampler = ElasticSampler(12, 1, 0, 4, seed=3)
    losses, evals = [], []
    for _ in range(steps):
        idx = sampler.next_indices()
        _, loss = model(data[idx, :-1], data[idx, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            evals.append(model(data[:4, :-1], data[:4, 1:])[1].item())
        model.train()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, evals


def test_cached_prefix_gives_exactly_the_recomputed_losses(tmp_path):
    ref_losses, ref_params, ref_evals = _train(None)
    row = 16 * 32 * 4  # one sample's prefix output: block_size × n_embd fp32
    cache = ActivationCache(limit_mb=5 * row / 2**20, spill_dir=tmp_path)  # 5 rows in memory, 7 on disk
    losses, params, evals = _train(cache)
    assert losses == ref_losses and evals == ref_evals
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)
    s = cache.stats()
    assert s["entries"] == 12 and s["memory_bytes"] == 5 * row and s["disk_bytes"] == 7 * row
    assert s["misses"] == 12 and s["hits"] == 9 * 4 * 2 - 12  # train + eval rows, each computed once
    # What trains: blocks[2:] and the final norm; embeddings (and the tied head) are frozen.
    torch.manual_seed(0)
    init = GPT(tiny_model_config(n_layer=3)).state_dict()
    for name in ("tok_emb.weight", "pos_emb.weight", "blocks.1.mlp.fc.weight"):
        assert torch.equal(params[name], init[name]), name
    assert not torch.equal(params["blocks.2.mlp.fc.weight"], init["blocks.2.mlp.fc.weight"])


def _trainer_losses(cfg_dict: dict, recompute: bool = False) -> dict:
    """Train per `cfg_dict` on this process's mesh; `recompute` drops the cache (the reference)."""
    cfg = Config.from_dict(cfg_dict)
    mesh = ParallelMesh.build() if cfg.parallel.zero else ParallelMesh.single()
    train, val = load_token_splits(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction)
    trainer = Trainer(cfg, mesh, train, val)
    if recompute:
        trainer.frozen_prefix.cache = None
    summary = trainer.fit()
    stats = trainer.frozen_prefix.cache.stats() if trainer.frozen_prefix.cache else {}
    return {"losses": [h["loss"] for h in summary["history"]], "val": summary["final_val_loss"],
            "stats": stats, "epoch": trainer.sampler.epoch}


def _small_run(tmp_path, **train):
    (tmp_path / "corpus.txt").write_text(tiny_text(n_words=120))  # ~40 sequences of 16 tokens
    return tiny_run_config(tmp_path, model={"n_layer": 3},
                           train={"steps": 20, "freeze_blocks": 2, "freeze_cache": True,
                                  "eval_interval": 8, **train})


def test_trainer_cache_in_memory_and_spilled_equals_recomputing(tmp_path):
    ref = _trainer_losses(_small_run(tmp_path).to_dict(), recompute=True)
    assert ref["epoch"] >= 1  # past the first epoch: entries are read back
    memory = _trainer_losses(_small_run(tmp_path).to_dict())
    disk = _trainer_losses(_small_run(tmp_path, freeze_cache_mb=0.0,
                                      freeze_cache_dir=str(tmp_path / "spill")).to_dict())
    for run in (memory, disk):
        assert run["losses"] == ref["losses"] and run["val"] == ref["val"]
        assert run["stats"]["hits"] > run["stats"]["misses"] > 0
    assert memory["stats"]["disk_bytes"] == 0 and disk["stats"]["memory_bytes"] == 0
    assert disk["stats"]["disk_bytes"] > 0


def test_cache_under_zero3_equals_recomputing(pools, tmp_path):
    cfg = _small_run(tmp_path, steps=12, micro_batch_size=2).to_dict()
    cfg["parallel"]["zero"] = 3
    cached = pools(2).run(_trainer_losses, cfg)
    ref = pools(2).run(_trainer_losses, cfg, True)
    for a, b in zip(cached, ref):
        assert a["losses"] == b["losses"] and a["val"] == b["val"]
        assert a["stats"]["hits"] > 0


# --- bad input --------------------------------------------------------------------------------


def test_bad_freeze_cache_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"train.freeze_cache = true caches the outputs of the frozen "
                                          r"blocks; set train.freeze_blocks ≥ 1"):
        validate(tiny_run_config(tmp_path, train={"freeze_cache": True}))
    with pytest.raises(ConfigError, match=r"needs model.dropout = 0 \(got 0.1\)"):
        validate(tiny_run_config(tmp_path, model={"dropout": 0.1},
                                 train={"freeze_cache": True, "freeze_blocks": 1}))
    with pytest.raises(ConfigError, match=r"train.freeze_cache_mb=-1.0 must be ≥ 0"):
        validate(tiny_run_config(tmp_path, train={"freeze_cache_mb": -1.0}))
    with pytest.raises(ConfigError, match=r"not combined with parallel.tp=2"):
        validate(tiny_run_config(tmp_path, train={"freeze_cache": True, "freeze_blocks": 1},
                                 parallel={"tp": 2}))
    with pytest.raises(ConfigError, match=r"train.freeze_cache must be of type bool"):
        tiny_run_config(tmp_path, train={"freeze_cache": "yes"})


def test_prefix_must_be_frozen_and_deterministic(tmp_path):
    model = GPT(tiny_model_config())
    with pytest.raises(ConfigError, match=r"blocks\[0:1\] must be frozen first"):
        cache_frozen_prefix(model, 1, None)
    freeze_blocks(model, 1)
    with pytest.raises(ConfigError, match=r"freeze_blocks in \[1, 2\]"):
        cache_frozen_prefix(model, 3, None)
    dropped = GPT(tiny_model_config(dropout=0.1))
    freeze_blocks(dropped, 1)
    with pytest.raises(ConfigError, match=r"needs model.dropout = 0"):
        cache_frozen_prefix(dropped, 1, None)
    cache_frozen_prefix(model, 1, None)
    with pytest.raises(ConfigError, match="already cached"):
        cache_frozen_prefix(model, 1, None)
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    cache = ActivationCache(limit_mb=0, spill_dir=unwritable / "spill")
    with pytest.raises(ConfigError, match=r"train.freeze_cache_dir=.*cannot be created"):
        cache.put(b"k", torch.zeros(2))

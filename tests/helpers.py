"""Small builders shared by tests: a tiny GPT config, a generated corpus, tensor comparison, a
free loopback port and a process group of one."""

from __future__ import annotations

import contextlib
import random
import socket
from typing import Iterator

import torch
import torch.distributed as dist

from plait.config import Config, ModelConfig
from plait.mesh import ParallelMesh

WORDS = ("the model data rank gradient bucket tensor process step loss mesh layer token sample "
         "batch epoch reduce gather scatter parameter optimizer").split()


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def tiny_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def tiny_run_config(tmp_path, **sections) -> Config:
    """A config for a seconds-long run on a generated corpus written under tmp_path."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(tiny_text())
    raw = {
        "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=16),
        "data": {"path": str(corpus), "val_fraction": 0.1},
        "train": dict(steps=5, micro_batch_size=4, warmup_steps=2, eval_interval=0,
                      log_interval=1, out_dir=str(tmp_path / "run"), lr=3e-3),
        "checkpoint": {"resume": "none"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.from_dict(raw)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def world_of_one(monkeypatch, device: str) -> Iterator[ParallelMesh]:
    """A real process group of one rank on `device` (NCCL on CUDA, Gloo on the CPU), as
    `plait train --nproc 1` makes it; destroyed afterwards."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    try:
        mesh = ParallelMesh.from_env(device=device)
        assert dist.get_backend() == ("nccl" if device == "cuda" else "gloo")
        yield mesh
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""train.device: "cuda" without CUDA is refused naming the field; "cpu" is honoured where CUDA
exists (CPU tensors, Gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.errors import ConfigError
from plait.launch import resolve_device
from tests.helpers import world_of_one


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match='train.device="cuda" but this machine has no usable CUDA'):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_is_honoured_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="train.device='tpu' is invalid"):
        resolve_device("tpu")


def test_mesh_from_env_keeps_a_cpu_job_on_the_cpu_with_gloo(monkeypatch):
    """With CUDA present, from_env(device="cpu") must neither pick a GPU nor NCCL."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: pytest.fail("a CPU job touched CUDA"))
    assert not dist.is_initialized()
    with world_of_one(monkeypatch, "cpu") as mesh:
        assert mesh.device == torch.device("cpu")
        assert dist.get_backend() == "gloo"

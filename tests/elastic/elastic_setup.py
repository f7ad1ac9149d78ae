"""What the elastic tests share: a corpus of exactly one epoch's sequences, seconds-long configs,
a reference run that changes world size on purpose (on the Gloo worker pool), and polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from plait.config import Config
from plait.data.dataset import load_token_splits
from plait.elastic.membership import adapt_to_world
from plait.mesh import ParallelMesh
from plait.train import checkpoint as ck
from plait.train.run import load_splits
from plait.train.trainer import Trainer
from tests.helpers import tiny_text

SEQUENCES = 96  # training sequences: 8 steps of a global batch of 12 are one epoch
STEPS = 8


def cli_config(folder: Path, name: str, out: str, steps: int = 3, extra: str = "") -> str:
    """A TOML config file for `plait train` (a tiny GPT on a generated corpus, no resume); its path.
    `extra` is appended to its [checkpoint] section."""
    text = folder / "corpus.txt"
    if not text.exists():
        text.write_text(tiny_text())
    path = folder / name
    path.write_text(f"""
[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
[data]
path = "{text}"
val_fraction = 0.1
[train]
steps = {steps}
micro_batch_size = 2
eval_interval = 0
log_interval = 1
device = "cpu"
out_dir = "{folder / out}"
[checkpoint]
resume = "none"
{extra}""")
    return str(path)


def corpus(folder: Path, block_size: int = 16) -> Path:
    """A text whose training split holds exactly SEQUENCES sequences of `block_size` tokens."""
    path = folder / "corpus.txt"
    text = tiny_text(2000)
    lo, hi = 100, len(text)
    while lo < hi:  # the shortest prefix with SEQUENCES training sequences
        mid = (lo + hi) // 2
        path.write_text(text[:mid])
        if len(load_token_splits(str(path), block_size, 0.1)[0]) >= SEQUENCES:
            hi = mid
        else:
            lo = mid + 1
    path.write_text(text[:lo])
    assert len(load_token_splits(str(path), block_size, 0.1)[0]) == SEQUENCES
    return path


def elastic_config(folder: Path, out: str, **elastic: Any) -> dict[str, Any]:
    """A tiny GPT, one epoch in STEPS steps of 12 sequences, a checkpoint every step."""
    return {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "data": {"path": str(folder / "corpus.txt"), "val_fraction": 0.1},
        "train": {"steps": STEPS, "micro_batch_size": 2, "warmup_steps": 1, "eval_interval": 0,
                  "log_interval": 1, "out_dir": str(folder / out), "lr": 3e-3, "device": "cpu"},
        "checkpoint": {"resume": "auto", "interval": 1, "keep": 20},
        "elastic": {"global_batch": 12, "log_samples": True, "timeout_s": 30, **elastic},
    }


def _reference_phase(cfg_dict: dict[str, Any], until: int | None) -> int:
    """On a pool rank: train at the pool's world size until `until` (then checkpoint), or to the
    end; returns the step reached."""
    mesh = ParallelMesh.build(device="cpu")
    cfg = adapt_to_world(Config.from_dict(cfg_dict), mesh.world_size)
    trainer = Trainer(cfg, mesh, *load_splits(cfg))
    if until is None:
        trainer.fit()
    else:
        trainer.fit(until=until)
        trainer.save()
    return trainer.step


def reference_run(pools, cfg_dict: dict[str, Any], worlds: list[tuple[int, int]]) -> None:
    """Train `cfg_dict` on purpose at world sizes [(world, until step), ...], the last to the end."""
    for i, (world, until) in enumerate(worlds):
        last = i == len(worlds) - 1
        reached = pools(world).run(_reference_phase, cfg_dict, None if last else until)
        assert set(reached) == {cfg_dict["train"]["steps"] if last else until}


def final_model(out_dir: Path) -> dict[str, torch.Tensor]:
    path = ck.latest_valid_checkpoint(out_dir / "checkpoints")
    assert path is not None and ck.checkpoint_step(path) == STEPS, path
    return ck.load_checkpoint(path)["model"]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every: float = 0.1,
             while_alive: Callable[[], bool] | None = None) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if while_alive is not None and not while_alive():
            raise AssertionError(f"the job ended while waiting for {what}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")

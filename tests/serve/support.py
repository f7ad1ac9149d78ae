"""Builders for the serving tests: a run folder as the trainer writes it, and `plait serve` in a
subprocess on loopback."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from plait.config import Config, ModelConfig
from plait.models import GPT
from plait.train.checkpoint import save_checkpoint

API_KEY = "test-key-[brackets]"


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Serving tests check exact tokens, not speed: one intra-op thread keeps them quick on a
    shared CPU (two threads waiting on each other under load cost more than they give on tiny
    models). `test_engine.py` has one parity test at two threads, the default on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt_config(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=256, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def write_run(root: Path, model_cfg: ModelConfig | None = None, seed: int = 0, step: int = 10) -> tuple[Path, GPT]:
    """A run folder holding one checkpoint of a random GPT, with the parts the trainer saves."""
    model_cfg = model_cfg or tiny_gpt_config()
    torch.manual_seed(seed)
    model = GPT(model_cfg).eval()
    cfg = Config(model=model_cfg)
    cfg.train.out_dir = str(root)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"step": step, "sampler": {}, "rng": [torch.get_rng_state()], "config": cfg.to_dict(),
             "mesh": {"dp": 1, "pp": 1, "tp": 1}}
    save_checkpoint(root / "checkpoints", step, {"model": model.state_dict(), "optim": optim.state_dict(),
                                                  "state": state})
    return root, model


class ServerProcess:
    """`plait serve PATH --port 0 ...` on 127.0.0.1; `url` once it answers /health."""

    def __init__(self, path: Path, *args: str, timeout_s: float = 90.0, threads: int = 1):
        # One intra-op thread, like the in-process engines the tests compare against.
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plait.cli", "serve", str(path), "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait_for_url(timeout_s)
        self._wait_healthy(timeout_s)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def _wait_for_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if m:
                return m.group(1)
        self.stop()
        raise RuntimeError("plait serve did not start:\n" + "".join(self.log))

    def _wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.url}/health", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2)
                if r.status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("plait serve never answered /health:\n" + "".join(self.log))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

"""Preemption seen from outside: a scheduler signals the launcher (`plait train --nproc`, or
plait's elastic agent, the torchrun replacement for clusters) or one worker; the workers
checkpoint and the command exits with code 75, so the job is requeued rather than counted as
failed. (torchrun itself exits 1 when it is signalled.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from plait.train import checkpoint as ck
from plait.train.metrics import read_metrics
from tests.elastic.elastic_setup import cli_config, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds workers in /proc (Linux)")

DEADLINE_S = 120


def _config(tmp_path: Path) -> str:
    """A run far longer than any test: it stops only on the signal."""
    return cli_config(tmp_path, "job.toml", "run", steps=100000, extra="interval = 0")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    """A process's command line; empty once it has exited."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _nodes(pid: int) -> list[int]:
    return _alive_agents(_children(pid))


def _alive_agents(pids: list[int]) -> list[int]:
    return [pid for pid in pids if b"plait.elastic.agent" in _cmdline(pid)]


def _workers(pid: int) -> list[int]:
    return [c for c in _children(pid) if b"spawn_main" in _cmdline(c) and b"resource_tracker" not in _cmdline(c)]


def _start_training(cmd: list[str], tmp_path: Path, ready: Callable[[int], bool] = lambda pid: True,
                    **popen: Any) -> subprocess.Popen:
    """Start `cmd` and return once it has trained a step and `ready(its pid)` holds."""
    proc = subprocess.Popen(cmd, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)
    try:
        wait_for("training to start", lambda: read_metrics(tmp_path / "run") and ready(proc.pid), DEADLINE_S,
                 every=0.2, while_alive=lambda: proc.poll() is None)
    except AssertionError as exc:
        proc.kill()
        raise AssertionError(f"{exc} (exit code {proc.wait()}): {proc.communicate()}") from None
    return proc


def _run_and_signal(cmd: list[str], tmp_path: Path, target: str) -> tuple[int, str, float]:
    """Start `cmd`, wait until it has trained a few steps, send SIGTERM to the launcher or to one
    worker; returns (exit code, stderr, seconds from the signal to the exit)."""
    proc = _start_training(cmd, tmp_path, lambda pid: len(_workers(pid)) == 2,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        victim = proc.pid if target == "launcher" else _workers(proc.pid)[-1]
        os.kill(victim, signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=DEADLINE_S)
        return proc.returncode, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _checkpointed_where_it_stopped(tmp_path: Path) -> None:
    newest = ck.latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest is not None, "no checkpoint was written"
    assert ck.checkpoint_step(newest) >= read_metrics(tmp_path / "run")[-1]["step"]


@pytest.mark.parametrize("target", ["launcher", "worker"])
def test_plait_train_exits_75_after_the_workers_checkpoint(tmp_path, target):
    cmd = [sys.executable, "-m", "plait.cli", "train", _config(tmp_path), "--nproc", "2"]
    code, err, took = _run_and_signal(cmd, tmp_path, target)
    assert code == 75, err
    assert "newest checkpoint" in err and "Traceback" not in err
    assert took < 20, f"{took:.1f} s from the signal to the exit"  # not torch's 30 s grace
    _checkpointed_where_it_stopped(tmp_path)


def test_the_elastic_agent_exits_75_when_signalled(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "plait.elastic.agent", _config(tmp_path), "--nnodes", "1",
           "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "preempt-test"]
    code, err, took = _run_and_signal(cmd, tmp_path, "launcher")
    assert code == 75, err
    assert took < 20, f"{took:.1f} s from the signal to the exit"
    _checkpointed_where_it_stopped(tmp_path)


def test_a_local_elastic_job_passes_the_signal_to_its_nodes_and_exits_75(tmp_path):
    cmd = [sys.executable, "-m", "plait.cli", "train", _config(tmp_path), "--elastic", "2:2", "--nproc", "2"]
    proc = _start_training(cmd, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        nodes = _children(proc.pid)  # each node's agent runs in a session of its own
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, err
    assert nodes and not _alive_agents(nodes), "a node outlived the job"
    _checkpointed_where_it_stopped(tmp_path)


def test_nodes_of_a_killed_local_elastic_job_checkpoint_and_stop(tmp_path):
    """SIGKILL (no chance to pass anything on) to `plait train --elastic`: its nodes, each in a
    session of its own, do not train on alone. Their agents lose the rendezvous store the launcher
    hosted and stop their workers with SIGTERM, on which the workers checkpoint."""
    cmd = [sys.executable, "-m", "plait.cli", "train", _config(tmp_path), "--elastic", "2:2", "--nproc", "2"]
    proc = _start_training(cmd, tmp_path, lambda pid: len(_nodes(pid)) == 2,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = _nodes(proc.pid)
    try:
        proc.kill()
        proc.wait()
        wait_for("the nodes to stop after their launcher", lambda: not _alive_agents(nodes), 60, every=0.2)
    finally:
        for pid in _alive_agents(nodes):
            os.killpg(pid, signal.SIGKILL)
    _checkpointed_where_it_stopped(tmp_path)

"""Parameter-server jobs in freshly launched processes: a worker is SIGKILLed mid-run and the job
completes; `plait train` runs a parameter-server config end to end and refuses bad ones."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import Config
from plait.parallel.parameter_server.launch import launch_tolerant
from plait.train.checkpoint import list_checkpoints
from plait.train.metrics import read_metrics
from plait.parallel.parameter_server.run import read_ps_summary
from tests.parallel.parameter_server.jobs import STALL_AT, VICTIM, job_with_victim

STEPS = 40


def _digits(tmp_path: Path, mode: str, nproc_servers: int = 1, **train) -> Config:
    return Config.from_dict({
        "model": {"arch": "mlp", "n_layer": 1, "n_embd": 32},
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "train": {"steps": STEPS, "micro_batch_size": 32, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                  "weight_decay": 0.0, "eval_interval": 0, "log_interval": 1, "device": "cpu",
                  "out_dir": str(tmp_path / "run"), **train},
        "checkpoint": {"resume": "none", "interval": 10},
        "parallel": {"ps": {"servers": nproc_servers, "mode": mode, "staleness": 2,
                            "worker_timeout_s": 3.0}},
    })


@pytest.mark.parametrize("mode", ["ssp", "async"])
def test_killed_worker_does_not_stop_the_job(tmp_path, mode):
    """1 server, 2 workers; worker rank 2 is SIGKILLed at step 5. In ssp the other is held at
    most 2 steps ahead of it until the server declares it dead; then it finishes."""
    cfg = _digits(tmp_path, mode)
    flag = str(tmp_path / "victim.pid")
    box: dict = {}

    def launch() -> None:
        try:
            box["outcome"] = launch_tolerant(job_with_victim, (cfg.to_dict(), flag), 3, tolerate={1, 2})
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=launch)
    thread.start()
    deadline = time.monotonic() + 120
    while not os.path.exists(flag) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(flag), box.get("error", "the victim never reached its step")
    os.kill(int(Path(flag).read_text()), signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    outcome = box["outcome"]
    assert list(outcome.failures) == [VICTIM] and "code -9" in outcome.failures[VICTIM]
    assert sorted(outcome.results) == [0, 1]
    server = outcome.results[0]
    assert server["dead_workers"] == [VICTIM]
    assert server["updates"] == STEPS + STALL_AT  # the survivor's steps and the victim's first 5
    survivor = outcome.results[1]
    assert survivor["status"] == "finished" and survivor["steps"] == STEPS
    assert survivor["val_accuracy"] > 0.8
    if mode == "ssp":
        assert survivor["max_ahead"] == 2 and survivor["bound_wait_s"] > 0
    rows = {r["rank"]: r for r in read_ps_summary(cfg.train.out_dir)}
    assert rows[VICTIM]["status"] == "died" and rows[VICTIM]["steps"] == STALL_AT
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints" / "server_0")
    assert ckpts and ckpts[-1].name == f"step_{STEPS + STALL_AT:08d}"


def _write(tmp_path: Path, cfg: Config) -> Path:
    lines = []
    for section in ("model", "data", "train", "checkpoint"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in getattr(cfg, section).__dict__.items()]
    lines.append("[parallel.ps]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in cfg.parallel.ps.__dict__.items()]
    path = tmp_path / "ps.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plait_train_runs_a_sync_parameter_server(tmp_path, capsys):
    path = _write(tmp_path, _digits(tmp_path, "sync", steps=20))
    assert main(["train", str(path), "--nproc", "3", "--set", "parallel.ps.optimizer=sgd",
                 "--set", "train.lr=0.1"]) == 0
    err = capsys.readouterr().err
    assert "2 worker(s), mode sync" in err and "server 0" in err and "worker 2" in err
    rows = read_ps_summary(tmp_path / "run")
    assert [(r["role"], r["rank"]) for r in rows] == [("server", 0), ("worker", 1), ("worker", 2)]
    assert rows[0]["updates"] == 20 and rows[0]["bytes_received"] > 0
    assert all(r["status"] == "finished" and r["steps"] == 20 for r in rows[1:])
    assert rows[1]["val_accuracy"] == rows[2]["val_accuracy"] > 0.5
    assert (tmp_path / "run" / "checkpoints" / "server_0" / "step_00000020" / "manifest.json").is_file()
    # Like every run, it writes out_dir/metrics.jsonl (the first worker's step records).
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all("loss" in r for r in records)
    # A digits classifier is no text model: generate says so instead of "no valid checkpoint".
    assert main(["generate", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.arch='mlp'" in err and "not a text model" in err


def _gpt_ps_job(cfg_dict: dict) -> dict:
    """A GPT trained by 1 server and 1 worker in the pool's processes; the worker returns the
    parameters it pulled last (the servers' final ones)."""
    import torch.distributed as dist

    from plait.parallel.parameter_server.run import build_model, run_ps

    cfg = Config.from_dict(cfg_dict)
    captured = {}
    real_build = build_model

    def build(c):
        captured["model"] = real_build(c)
        return captured["model"]

    import plait.parallel.parameter_server.run as ps_run
    ps_run.build_model = build
    try:
        summary = run_ps(cfg)
    finally:
        ps_run.build_model = real_build
    params = {k: v.detach().clone() for k, v in captured["model"].state_dict().items()}
    return {"rank": dist.get_rank(), "summary": summary, "params": params}


def test_a_gpt_parameter_server_run_writes_metrics_and_generates(pools, tmp_path, capsys):
    from plait.generate import load_model
    from tests.helpers import max_abs_diff, tiny_run_config

    cfg = tiny_run_config(tmp_path, train={"steps": 4, "device": "cpu"},
                          checkpoint={"interval": 2}, parallel={"ps": {"servers": 1, "mode": "sync"}})
    results = pools(2).run(_gpt_ps_job, cfg.to_dict())
    worker = next(r for r in results if r["rank"] == 1)
    assert worker["summary"]["status"] == "finished"
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    model, loaded_cfg = load_model(tmp_path / "run")
    assert loaded_cfg.model == cfg.model
    assert max_abs_diff(model.state_dict(), worker["params"]) == 0.0
    assert main(["generate", str(tmp_path / "run"), "--max-new-tokens", "5", "--prompt", "the "]) == 0
    assert capsys.readouterr().out.startswith("the ")


@pytest.mark.parametrize("override,message", [
    ("parallel.ps.servers=3", "parallel.ps.servers=3 leaves no worker among --nproc 3"),
    ("parallel.ps.mode=gossip", "parallel.ps.mode='gossip' is invalid"),
    ("parallel.ps.staleness=-1", "parallel.ps.staleness=-1 must be ≥ 0"),
])
def test_plait_train_refuses_bad_parameter_server_configs(tmp_path, capsys, override, message):
    path = _write(tmp_path, _digits(tmp_path, "async"))
    assert main(["train", str(path), "--nproc", "3", "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

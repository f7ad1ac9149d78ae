"""`plait fl`, and the same apps on Flower's own runtimes: the simulation runtime (Ray) and a
loopback deployment (SuperLink + SuperNodes, TLS, node authentication)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from plait.cli import config_toml, main
from tests.fl.support import digits_config


def _write(tmp_path: Path, cfg) -> Path:
    cfg.train.out_dir = str(tmp_path / "run")
    path = tmp_path / "fl.toml"
    path.write_text(config_toml(cfg.to_dict()))
    return path


def test_plait_fl_runs_and_writes_its_history(tmp_path, capsys):
    path = _write(tmp_path, digits_config(rounds=1))
    assert main(["fl", str(path)]) == 0
    history = json.loads((tmp_path / "run" / "fl_history.json").read_text())
    assert [r["round"] for r in history["history"]] == [0, 1] and len(history["partitions"]) == 10
    assert "federated run" in capsys.readouterr().err


def test_plait_fl_refuses_a_config_without_clients(tmp_path, capsys):
    cfg = digits_config()
    path = _write(tmp_path, cfg)
    assert main(["fl", str(path), "--set", "fl.clients=0"]) == 2
    assert "fl.clients" in capsys.readouterr().err
    assert main(["fl", str(path), "--set", "fl.strategy=fedsgd"]) == 2
    assert "fl.strategy='fedsgd' is invalid" in capsys.readouterr().err


def test_plait_fl_writes_a_deployment_and_its_commands(tmp_path, capsys):
    path = _write(tmp_path, digits_config(clients=2, min_clients=2))
    assert main(["fl", str(path), "--deploy-dir", str(tmp_path / "dep")]) == 0
    out = capsys.readouterr().out
    assert "flower-superlink" in out and "--enable-supernode-auth" in out
    assert "--disable-runtime-dependency-installation" in out and out.count("flwr supernode register") == 2
    for name in ("app/pyproject.toml", "app/plait_fl_app.py", "certs/ca.crt", "certs/server.pem",
                 "keys/supernode_0", "keys/supernode_1.pub", "flwr_home/config.toml"):
        assert (tmp_path / "dep" / name).is_file(), name
    assert "plait-config" in (tmp_path / "dep" / "app" / "pyproject.toml").read_text()


@pytest.mark.flower_runtime
def test_the_local_runner_matches_flowers_simulation_runtime():
    from plait.fl.runner import run_local
    from plait.fl.simulation import run_simulation

    cfg = digits_config(clients=3, rounds=2, seed=3)
    local, flower = run_local(cfg), run_simulation(cfg)
    for k in local.final:  # the same updates; only the order of the sums may differ
        np.testing.assert_allclose(local.final[k], flower.final[k], atol=1e-6)
    assert [r["accuracy"] for r in local.history] == pytest.approx([r["accuracy"] for r in flower.history], abs=1e-6)


@pytest.mark.flower_runtime
def test_loopback_deployment_with_tls_and_node_auth(tmp_path):
    from plait.fl.deploy import LoopbackDeployment, free_port, prepare

    cfg = digits_config(clients=2, min_clients=2, rounds=2)
    cfg.train.out_dir = str(tmp_path / "run")
    dep = prepare(config_toml(cfg.to_dict()), tmp_path / "dep", 2, port=free_port(), extra_keys=1)
    dep.node_ports = [free_port() for _ in range(3)]
    history = tmp_path / "run" / "fl_history.json"
    with LoopbackDeployment(dep) as d:
        d.start("superlink", dep.superlink())
        d.wait_for_port()
        for i in range(2):
            d.call(f"register{i}", dep.register(i))
        d.start("intruder", dep.supernode(1, key=2))  # a key the SuperLink never saw
        for i in range(2):
            d.start(f"supernode{i}", dep.supernode(i))
        d.call("run", dep.run(), timeout=240)
        deadline = time.monotonic() + 60
        while not history.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = json.loads(d.call("list", ["flwr", "supernode", "list", "plait", "--format", "json"]).stdout)
        intruder_log = d.log_text("intruder")
    rows = json.loads(history.read_text())["history"]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["accepted"] == 2 for r in rows[1:])
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert "Failed to activate SuperNode" in intruder_log
    assert len(nodes["nodes"]) == 2

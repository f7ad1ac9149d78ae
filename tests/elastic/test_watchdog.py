"""Hangs become errors: a stopped peer (SIGSTOP) is named by rank within the collective timeout,
and the agents restart the group; heartbeats of an earlier round are never read."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from plait.elastic.membership import read_rounds, read_workers
from plait.elastic.watchdog import Watchdog
from plait.errors import HangError
from plait.launch import ElasticJob
from plait.train.metrics import read_metrics
from tests.elastic.elastic_setup import corpus, elastic_config, wait_for

TIMEOUT_S = 4.0


def test_a_stopped_peer_is_named_within_the_timeout_and_the_group_restarts(tmp_path):
    corpus(tmp_path)
    cfg = elastic_config(tmp_path, "run", timeout_s=TIMEOUT_S, heartbeat_s=0.5)
    cfg["profile"] = {"slow_rank": 0, "slow_factor": 100.0}  # steps long enough to stop one mid-run
    cfg["train"]["steps"] = 5
    report = tmp_path / "run" / "elastic" / "hang.json"
    with ElasticJob(cfg, nodes=3, min_nodes=3, max_nodes=3, work_dir=tmp_path / "job") as job:
        alive = lambda: any(p.poll() is None for p in job.nodes)
        wait_for("step 2", lambda: (m := read_metrics(tmp_path / "run")) and m[-1]["step"] >= 2, 240,
                 while_alive=alive)
        os.kill(read_workers(tmp_path / "run")[2]["pid"], signal.SIGSTOP)
        stopped = time.time()
        wait_for("the hang report", report.is_file, 60, every=0.05, while_alive=alive)
        found = json.loads(report.read_text())
        summary = job.wait(240)  # the agents restart the group (the stopped worker is killed)
    assert found["ranks"] == [2], found
    assert "rank 2 (silent" in found["message"] and "elastic.timeout_s=4" in found["message"]
    # Reported when the collective timed out: not before, and within the timeout (plus the
    # report's own latency on a loaded machine), not Gloo's 30 minutes.
    assert TIMEOUT_S - 0.5 <= found["time"] - stopped <= TIMEOUT_S + 4, found["time"] - stopped
    assert summary["step"] == 5
    assert [r["world_size"] for r in read_rounds(tmp_path / "run")] == [3, 3]


def _store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def test_watchdog_names_the_silent_rank_and_ignores_an_earlier_rounds_keys():
    store = _store()
    client = lambda: dist.TCPStore("127.0.0.1", store.port, is_master=False)
    old = [Watchdog(client(), r, 3, timeout_s=2, heartbeat_s=0.1, namespace="plait/round-a") for r in range(3)]
    for w in old:
        w.start()
    time.sleep(0.5)
    old[2].stop()  # rank 2 stops answering
    time.sleep(0.6)
    assert list(old[0].stalled()) == [2] and list(old[1].stalled()) == [2]
    err = old[0].report(RuntimeError("Timed out waiting 2000ms for recv operation to complete"))
    assert isinstance(err, HangError) and str(err).startswith("rank 2 (silent")
    for w in old[:2]:
        w.stop()

    # A new round: its rank 2 has not beaten yet, but round a's counters must not count for it.
    new = [Watchdog(client(), r, 3, timeout_s=2, heartbeat_s=0.1, namespace="plait/round-b") for r in range(2)]
    for w in new:
        w.start()
    new[0]._observe()
    assert new[0]._seen[2][0] == 0  # nothing read from round a
    for w in new:
        w.stop()


def test_guard_leaves_other_errors_alone():
    store = _store()
    dogs = [Watchdog(dist.TCPStore("127.0.0.1", store.port, is_master=False), r, 2, timeout_s=2,
                     heartbeat_s=0.1, namespace="plait/x") for r in range(2)]
    dogs[1].start()
    with pytest.raises(ValueError, match="not a hang"), dogs[0].guard():
        time.sleep(0.3)
        raise ValueError("not a hang")
    dogs[1].stop()

"""The command line: `plait train --elastic` refuses what cannot run before starting anything, and
`plait multiplex` runs two jobs on one process end to end."""

from __future__ import annotations

import pytest

from plait.cli import main
from plait.train.metrics import read_metrics
from tests.elastic.elastic_setup import cli_config


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "5", "--elastic", "2:4"], "--nproc 5 must be within --elastic 2:4"),
    (["--nproc", "2", "--elastic", "two"], "--elastic 'two' must be MIN:MAX"),
    (["--nproc", "3", "--elastic", "2:4", "--set", "elastic.global_batch=12"],
     "elastic.global_batch: the global batch 12 is not a multiple of dp × train.micro_batch_size = 4 × 2"),
    (["--nproc", "2", "--elastic", "3:2"], "elastic.min_nodes=3, elastic.max_nodes=2"),
    (["--nproc", "2", "--elastic", "2:3", "--set", "elastic.batch=\"grow\""], "elastic.batch='grow' is invalid"),
    (["--nproc", "2", "--set", "elastic.timeout_s=0"], "elastic.timeout_s=0.0 must be > 0"),
])
def test_train_elastic_refuses_bad_input_before_launch(tmp_path, capsys, argv, message):
    cfg = cli_config(tmp_path, "a.toml", "run")
    assert main(["train", cfg, *argv]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_multiplex_runs_two_jobs_on_one_process(tmp_path, capsys):
    a = cli_config(tmp_path, "a.toml", "a", steps=3)
    b = cli_config(tmp_path, "b.toml", "b", steps=5)
    assert main(["multiplex", a, b, "--nproc", "1", "--quantum", "2"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert "multiplexed jobs" in err and "multiplexing 2 jobs on 1 processes" in err

"""The `plait` command end to end: a real 2-process launch, sampling, and bad input."""

from __future__ import annotations

import json

from rich.console import Console

from plait import cli
from plait.cli import main
from tests.helpers import tiny_text


def write_config(tmp_path, run_name: str = "run", **train):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text())
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items())
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[model]\nn_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 16\n"
        f"[data]\npath = {json.dumps(str(corpus))}\nval_fraction = 0.1\n"
        f"[train]\nsteps = 6\nmicro_batch_size = 4\neval_interval = 3\nwarmup_steps = 1\nlog_interval = 1\n"
        f"out_dir = {json.dumps(str(tmp_path / run_name))}\n{extra}"
        "[checkpoint]\nresume = \"none\"\n"
    )
    return cfg


def test_train_on_two_processes_then_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "console", Console(stderr=True, width=400))  # no wrapped paths
    # Square brackets in the run folder's name are printed as they are, not read as markup.
    cfg = write_config(tmp_path, run_name="exp[v2]")
    assert main(["train", str(cfg), "--nproc", "2", "--set", "train.lr=0.005"]) == 0
    run = tmp_path / "exp[v2]"
    assert str(run / "checkpoints" / "step_00000006") in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert set(records[0]) == {"step", "val_loss"}  # the held-out loss before training
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= records[1].keys()
    assert "val_loss" in records[3] and "val_loss" in records[6]
    assert (run / "checkpoints" / "step_00000006" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "the ", "--max-new-tokens", "20", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the ") and len(first.encode()) >= 20
    main(["generate", str(run), "--prompt", "the ", "--max-new-tokens", "20", "--seed", "3"])
    assert capsys.readouterr().out == first  # same seed, same text


def test_bad_config_fails_before_launch(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--nproc", "2", "--set", "train.steps=0"]) == 2
    assert "train.steps=0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mesh_that_does_not_fit_nproc(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--nproc", "3", "--set", "parallel.dp=2"]) == 2
    assert "world size 3" in capsys.readouterr().err


def test_bad_corpus_path_fails_before_launch(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--set", f"data.path={tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_from_nothing(tmp_path, capsys):
    assert main(["generate", str(tmp_path)]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err

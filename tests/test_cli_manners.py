"""CLI manners: fast --help/--version, -v anywhere, documented flags, --print-config, literal
printing of user text, one-line errors, and the examples' settings."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from plait import cli
from plait.cli import build_parser, main
from plait.config import Config, load_config
from plait.errors import CheckpointError
from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]


def _run_without_torch(args: list[str]) -> tuple[str, bool]:
    """Run `plait ARGS` in a fresh interpreter; (stdout, whether torch got imported)."""
    code = ("import sys\nfrom plait.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    body, _, flag = out.rpartition("TORCH ")
    return body, flag.strip() == "True"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["train", "--help"], ["generate", "--help"]])
def test_help_and_version_import_no_torch(args):
    out, torch_imported = _run_without_torch(args)
    assert not torch_imported
    if args == ["--version"]:
        from plait import __version__
        assert out.strip() == f"plait {__version__}"


def test_print_config_imports_no_torch_and_starts_nothing(tmp_path):
    cfg = write_config(tmp_path)
    out, torch_imported = _run_without_torch(["train", str(cfg), "--print-config"])
    assert not torch_imported and "[train]" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,verbose", [
    (["train", "c.toml", "-v"], True),
    (["train", "c.toml", "--verbose", "--nproc", "2"], True),
    (["-v", "train", "c.toml"], True),
    (["train", "c.toml"], False),
    (["generate", "run", "-v"], True),
])
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_every_generate_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.dest for a in sub.choices["generate"]._actions if not a.help or a.help == argparse.SUPPRESS]
    assert not missing


def test_print_config_prints_the_resolved_config_as_toml(tmp_path, capsys):
    cfg = write_config(tmp_path)
    overrides = ["train.lr=0.02", "parallel.ps.staleness=5", 'train.out_dir="o [x] \\"q\\""']
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main(["train", str(cfg), *sets, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert Config.from_dict(tomllib.loads(printed)) == load_config(cfg, overrides)
    assert not (tmp_path / "run").exists()


def test_fresh_means_resume_none(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--set", "checkpoint.resume=auto", "--fresh", "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["checkpoint"]["resume"] == "none"


def test_cuda_without_cuda_is_refused_before_launch(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--set", "train.device=cuda"]) == 2
    assert 'train.device="cuda" but this machine has no usable CUDA' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err


# --- user text is printed literally ---------------------------------------------------------


def test_error_hints_in_square_brackets_are_printed(monkeypatch, capsys):
    def fails(args):
        raise CheckpointError("checkpoint 'x' does not fit this model/optimizer (check [model]): size")

    monkeypatch.setattr(cli, "cmd_generate", fails)
    assert main(["generate", "x"]) == 2
    assert "(check [model])" in capsys.readouterr().err


def test_a_path_with_a_closing_tag_does_not_crash_the_error_handler(tmp_path, capsys):
    path = tmp_path / "a[/x]" / "c.toml"
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a[/x]" in err and "does not exist" in err


def test_a_corpus_name_with_brackets_is_reported_as_it_is(tmp_path, capsys):
    cfg = write_config(tmp_path)
    missing = tmp_path / "corpus[en].txt"
    assert main(["train", str(cfg), "--set", f"data.path={missing}"]) == 2
    assert "corpus[en].txt" in capsys.readouterr().err


def test_progress_prints_paths_literally():
    from plait.progress import progress_callbacks

    buf = io.StringIO()
    cb = progress_callbacks(Console(file=buf, width=200, force_terminal=False))
    cb.on_start({"mesh": "mesh dp=1 × pp=1 × tp=1", "params": 10, "tokens_per_step": 64,
                 "resumed_from": "exp[v2]/checkpoints/step_00000002", "steps": 4, "start_step": 2})
    cb.on_eval({"step": 3, "val_loss": 1.0})
    cb.on_end({"checkpoint": "exp[v2]/checkpoints/step_00000004"})
    out = buf.getvalue()
    assert "resumed from exp[v2]/checkpoints/step_00000002" in out
    assert "checkpoint: exp[v2]/checkpoints/step_00000004" in out


# --- errors --------------------------------------------------------------------------------


def test_worker_errors_reach_the_user_as_one_line(tmp_path, capsys):
    """A batch larger than the data is found inside the training process: the user sees
    plait's message, not torch's traceback, which goes to the run's error.log."""
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--set", "train.micro_batch_size=100000"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the" in err and "train.micro_batch_size" in err
    assert "Traceback" not in err and "DataError:" not in err
    log = tmp_path / "run" / "error.log"
    assert "Traceback" in log.read_text() and str(log) in err


def test_failure_messages_group_ranks_and_keep_plait_messages():
    from plait.launch import RankFailure, _from_torch_message, failure_error

    assert _from_torch_message("CheckpointError: checkpoint 'x' is missing") == "checkpoint 'x' is missing"
    assert _from_torch_message("RuntimeError: boom") == "RuntimeError: boom"
    err = failure_error([RankFailure(1, "bad batch", "tb1"), RankFailure(0, "bad batch", "tb0")])
    assert str(err).splitlines()[0] == "bad batch (ranks 0, 1)"
    err = failure_error([RankFailure(0, "a"), RankFailure(2, "Signal 9 (SIGKILL)")])
    assert str(err) == "rank 0: a\nrank 2: Signal 9 (SIGKILL)"


def test_a_missing_resume_path_is_refused_before_launch(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["train", str(cfg), "--set", f"checkpoint.resume={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.resume" in err and "nope" in err and "Traceback" not in err


def test_generate_says_which_older_checkpoint_it_used(tmp_path, capsys):
    from plait.data.dataset import load_token_splits
    from plait.mesh import ParallelMesh
    from plait.train.trainer import Trainer
    from tests.helpers import tiny_run_config

    cfg = tiny_run_config(tmp_path, train={"steps": 2}, checkpoint={"interval": 1, "keep": 3})
    Trainer(cfg, ParallelMesh.single(), *load_token_splits(cfg.data.path, 16, 0.1)).fit()
    newest = tmp_path / "run" / "checkpoints" / "step_00000002"
    (newest / "manifest.json").write_text("{")
    assert main(["generate", str(tmp_path / "run"), "--max-new-tokens", "3", "--prompt", "a"]) == 0
    err = capsys.readouterr().err
    assert "step_00000002" in err and "corrupted" in err
    assert f"using the newest valid checkpoint instead: {tmp_path / 'run' / 'checkpoints' / 'step_00000001'}" in err


def test_examples_resume_automatically():
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        assert load_config(path).checkpoint.resume == "auto", path.name

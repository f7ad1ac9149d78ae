"""Search specs and sweep checks: every bad input is refused before Ray or any trial starts."""

from __future__ import annotations

import sys

import pytest

from plait.config import TuneConfig
from plait.errors import ConfigError
from plait.tune.space import Distribution, corner_points, parse_space, parse_spec
from plait.tune.sweep import Sweep, check_sweep
from tests.tune.helpers import digits_base


def test_specs_parse_to_distributions():
    assert parse_spec("train.lr=loguniform(1e-4, 1e-2)") == ("train.lr", Distribution("loguniform", (1e-4, 1e-2)))
    assert parse_spec("parallel.zero=choice(0,1,2)")[1] == Distribution("choice", (0, 1, 2))
    assert parse_spec("model.n_layer=randint(2, 4)")[1] == Distribution("randint", (2, 4))
    assert parse_spec("parallel.schedule=grid(gpipe, 1f1b)")[1] == Distribution("grid", ("gpipe", "1f1b"))
    assert parse_spec("train.weight_decay=uniform(0, 0.1)")[1] == Distribution("uniform", (0.0, 0.1))
    # --search wins over the [tune] table for the same field
    space = parse_space({"train.lr": "uniform(0.1, 0.2)"}, ["train.lr=loguniform(1e-3, 1e-2)"])
    assert space["train.lr"].kind == "loguniform"


@pytest.mark.parametrize("spec,words", [
    ("train.lrr=loguniform(1e-4, 1e-2)", ["unknown field 'train.lrr'", "valid:", "lr_scaling"]),
    ("trian.lr=choice(1, 2)", ["unknown field 'trian.lr'", "valid:", "train"]),
    ("train=choice(1, 2)", ["is a section"]),
    ("train.lr=loguniform(1e-4)", ["takes two numbers"]),
    ("train.lr=logunifrom(1e-4, 1e-2)", ["not a distribution", "loguniform"]),
    ("train.lr=loguniform(1e-4, 1e-2", ["not a distribution"]),
    ("train.lr=loguniform(0, 1e-2)", ["0 < low"]),
    ("train.lr=uniform(0.2, 0.1)", ["below the high end"]),
    ("model.n_layer=uniform(1, 4)", ["model.n_layer is int", "randint"]),
    ("train.lr=randint(1, 4)", ["randint", "uniform or loguniform"]),
    ("train.lr=choice()", ["one or more values"]),
    ("train.lr 1e-3", ["no '='"]),
    ("tune.trials=choice(1, 2)", ["[tune] section"]),
    ("profile.speeds=choice(1, 2)", ["list or table"]),
])
def test_bad_specs_name_the_field_and_what_is_valid(spec, words):
    with pytest.raises(ConfigError) as err:
        parse_spec(spec)
    for w in words:
        assert w in str(err.value)


def _sweep(tmp_path, specs, **settings):
    return Sweep(digits_base(tmp_path / "run"), parse_space({}, specs), TuneConfig(**settings), tmp_path / "s")


def test_corner_configs_are_validated_before_any_trial(tmp_path):
    # lr's low end falls under train.min_lr: that trial could not start
    with pytest.raises(ConfigError, match=r"train.lr=1e-07.*train.min_lr"):
        check_sweep(_sweep(tmp_path, ["train.lr=loguniform(1e-7, 1e-2)"]), cpus=2)
    with pytest.raises(ConfigError, match=r"model.n_layer='two'.*must be of type int"):
        check_sweep(_sweep(tmp_path, ["model.n_layer=choice(1, two)"]), cpus=2)
    with pytest.raises(ConfigError, match="parallel.pp=2 must be 1"):  # the mlp has no pipeline cut
        check_sweep(_sweep(tmp_path, ["parallel.pp=choice(1, 2)"]), cpus=4)
    with pytest.raises(ConfigError, match="nothing to search"):
        check_sweep(_sweep(tmp_path, []), cpus=2)


def test_a_layout_larger_than_the_machine_is_refused(tmp_path):
    sweep = _sweep(tmp_path, ["parallel.dp=choice(1, 2, 4)"])
    with pytest.raises(ConfigError) as err:
        check_sweep(sweep, cpus=2)
    assert "parallel.dp=4" in str(err.value) and "4 processes" in str(err.value) and "2 CPUs" in str(err.value)
    assert check_sweep(sweep, cpus=4) == 4
    with pytest.raises(ConfigError, match="8 processes"):
        check_sweep(_sweep(tmp_path, ["train.lr=choice(1e-2)"], nproc=8), cpus=2)


def test_searcher_rules(tmp_path):
    with pytest.raises(ConfigError, match=r"write choice\(\.\.\.\) instead"):
        check_sweep(_sweep(tmp_path, ["train.lr=grid(1e-2, 1e-3)"], searcher="tpe"), cpus=2)
    check_sweep(_sweep(tmp_path, ["train.lr=choice(1e-2, 1e-3)"], searcher="tpe"), cpus=2)


def test_corner_points_cover_every_listed_value_and_both_ends():
    space = parse_space({}, ["train.lr=loguniform(1e-4, 1e-2)", "parallel.zero=choice(0, 1, 2)"])
    points = corner_points(space)
    assert len(points) == 6
    assert {p["train.lr"] for p in points} == {1e-4, 1e-2}
    assert {p["parallel.zero"] for p in points} == {0, 1, 2}


def test_the_command_refuses_bad_input_without_starting_ray(tmp_path, capsys):
    from plait.cli import config_toml, main
    from plait.config import Config

    path = tmp_path / "base.toml"
    path.write_text(config_toml(Config.from_dict(digits_base(tmp_path / "run")).to_dict()))
    assert main(["tune", str(path), "--search", "train.nope=choice(1, 2)"]) == 2
    assert "unknown field 'train.nope'" in capsys.readouterr().err
    assert main(["tune", str(path), "--search", "parallel.dp=choice(1, 64)", "--num-cpus", "2"]) == 2
    assert "more than the 2 CPUs" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()

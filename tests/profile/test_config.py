"""The [profile] table and parallel.stage_speeds: bad values name the field and what is valid."""

from __future__ import annotations

import pytest

from plait.config import load_config, validate
from plait.errors import ConfigError


@pytest.mark.parametrize("override,field", [
    ("profile.steps=-1", "profile.steps"),
    ("profile.start=0", "profile.start"),
    ("profile.straggler_interval=-5", "profile.straggler_interval"),
    ("profile.straggler_threshold=0", "profile.straggler_threshold"),
    ('profile.balance="fast"', "profile.balance"),
    ("profile.balance_steps=0", "profile.balance_steps"),
    ("profile.slow_rank=-2", "profile.slow_rank"),
    ("profile.slow_factor=0.5", "profile.slow_factor"),
    ('profile.slow_phase="data"', "profile.slow_phase"),
    ("profile.speeds=[1, 0.5]", "profile.speeds"),          # without balance = "speed"
    ('profile.speeds="fast"', "profile.speeds"),             # not a list
    ("profile.speeds=[1, true]", "profile.speeds"),
    ("parallel.stage_speeds=[1, 2]", "parallel.stage_speeds"),  # pp = 1
])
def test_bad_profile_fields_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_speed_balance_rules_and_world_size_checks():
    speed = ['profile.balance="speed"']
    with pytest.raises(ConfigError, match="parallel.zero=2"):
        load_config(None, speed + ["parallel.zero=2"])
    with pytest.raises(ConfigError, match="interleaved"):
        load_config(None, speed + ["parallel.pp=2", 'parallel.schedule="interleaved"'])
    with pytest.raises(ConfigError, match="profile.speeds=.* must all be > 0"):
        load_config(None, speed + ["profile.speeds=[1, -1]"])
    with pytest.raises(ConfigError, match="parallel.stage_speeds"):
        load_config(None, ["parallel.pp=2", "parallel.stage_speeds=[1, 2, 3]"])
    cfg = load_config(None, speed + ["profile.speeds=[1, 0.5]", "profile.slow_rank=1"])
    validate(cfg, 2)
    with pytest.raises(ConfigError, match="2 speeds for --nproc 4"):
        validate(cfg, 4)
    with pytest.raises(ConfigError, match="profile.slow_rank=1 is not a rank"):
        validate(load_config(None, ["profile.slow_rank=1"]), 1)
    cfg = load_config(None, speed + ["parallel.pp=2", "parallel.microbatches=2", "train.grad_accum=2"])
    with pytest.raises(ConfigError, match="parallel.microbatches=2 must be 0"):
        validate(cfg, 4)  # dp = 2 under pp = 2
    validate(cfg, 2)      # dp = 1: only the stages are cut by speed


def test_train_profile_flag_sets_the_traced_steps(capsys):
    from plait.cli import main

    assert main(["train", "examples/tiny_gpt.toml", "--profile", "3", "--print-config"]) == 0
    out = capsys.readouterr().out
    section = out[out.index("[profile]"):]
    assert "steps = 3" in section and "speeds = []" in section
    assert main(["train", "examples/tiny_gpt.toml", "--profile", "-1", "--print-config"]) == 2
    assert "profile.steps=-1 must be ≥ 0" in capsys.readouterr().err

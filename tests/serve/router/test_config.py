"""Replica counts and autoscaling settings: Ray Serve's names, clear errors for bad values, and
the scaling decisions over time."""

from __future__ import annotations

import dataclasses

import pytest

from plait.cli import build_parser, main
from plait.errors import ConfigError
from plait.serve.commands import replica_args, serve_mode
from plait.serve.router import AutoscalingConfig
from plait.serve.router.autoscaler import Autoscaler


def serve_args(*flags: str):
    return build_parser().parse_args(["serve", "run", *flags])


def test_field_names_are_ray_serves_keys():
    names = [f.name for f in dataclasses.fields(AutoscalingConfig)]
    assert names == ["min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                     "downscale_delay_s"]
    # And Ray Serve accepts them, with the same defaults.
    ray_config = pytest.importorskip("ray.serve.config")
    ray = ray_config.AutoscalingConfig(**dataclasses.asdict(AutoscalingConfig(min_replicas=0, max_replicas=3)))
    assert (ray.min_replicas, ray.max_replicas) == (0, 3)
    default = ray_config.AutoscalingConfig()
    assert dataclasses.asdict(AutoscalingConfig()) == {n: getattr(default, n) for n in names}


@pytest.mark.parametrize("flags, message", [
    (["--min-replicas", "3", "--max-replicas", "2"], "min_replicas=3 exceeds max_replicas=2"),
    (["--max-replicas", "2", "--upscale-delay-s", "-1"], "upscale_delay_s=-1.0 (--upscale-delay-s) must be a non-negative"),
    (["--max-replicas", "2", "--downscale-delay-s", "nan"], "downscale_delay_s=nan"),
    (["--max-replicas", "2", "--target-ongoing-requests", "0"], "target_ongoing_requests=0.0"),
    (["--max-replicas", "0"], "max_replicas=0 (--max-replicas) must be an integer ≥ 1"),
    (["--min-replicas", "-1"], "min_replicas=-1"),
    (["--replicas", "0"], "replicas=0 (--replicas) must be an integer ≥ 1"),
    (["--replicas", "2", "--max-replicas", "3"], "--replicas fixes the replica count"),
    (["--tp", "0"], "--tp 0 must be ≥ 1"),
])
def test_bad_values_are_clear_errors(flags, message):
    with pytest.raises(ConfigError) as exc:
        serve_mode(serve_args(*flags))
    assert message in str(exc.value)


def test_cli_reports_bad_values_before_starting_anything(capsys):
    assert main(["serve", "no/such/run", "--min-replicas", "3", "--max-replicas", "1"]) == 2
    assert "min_replicas=3 exceeds max_replicas=1" in capsys.readouterr().err


def test_modes_and_replica_command_line():
    assert serve_mode(serve_args()) == ("local", None)
    assert serve_mode(serve_args("--tp", "2")) == ("model_parallel", None)
    assert serve_mode(serve_args("--replicas", "2", "--tp", "2"))[0] == "router"
    mode, scaling = serve_mode(serve_args("--min-replicas", "0", "--max-replicas", "4", "--upscale-delay-s", "1"))
    assert mode == "router" and scaling == AutoscalingConfig(0, 4, 2.0, 1.0, 600.0)
    mode, scaling = serve_mode(serve_args("--backend", "ray", "--replicas", "3"))
    assert mode == "ray" and (scaling.min_replicas, scaling.max_replicas) == (3, 3)
    args = replica_args(serve_args("--replicas", "2", "--tp", "2", "--quantize", "int8", "--max-seqs", "4"))
    assert args[args.index("--tp") + 1] == "2" and args[args.index("--quantize") + 1] == "int8"
    assert args[args.index("--max-seqs") + 1] == "4" and "--replicas" not in args


def test_scaling_decisions_follow_the_delays():
    """Ray Serve's policy on an explicit clock: up after upscale_delay_s of wanting more, down
    after downscale_delay_s of wanting fewer, 1 → 0 last, and a request at zero starts one at once."""
    s = Autoscaler(AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=2,
                                     upscale_delay_s=1.0, downscale_delay_s=3.0), look_back_s=0.5)
    assert s.decide(0.0, target=0, waiting=1) == 1  # cold start, no delay
    t, target = 0.0, 1
    for _ in range(10):  # 7 ongoing → 4 wanted, from t = 0.1 s to 1.0 s: not yet
        t += 0.1
        s.observe(t, 7)
        target = s.decide(t, target)
    assert target == 1
    s.observe(1.1, 7)
    assert s.decide(1.1, 1) == 4
    # A dip below the target resets the wait.
    s2 = Autoscaler(AutoscalingConfig(0, 4, 2, 1.0, 3.0), look_back_s=0.0)
    s2.observe(0.0, 7); assert s2.decide(0.0, 1) == 1
    s2.observe(0.6, 2); assert s2.decide(0.6, 1) == 1
    s2.observe(1.2, 7); assert s2.decide(1.2, 1) == 1
    s2.observe(2.2, 7); assert s2.decide(2.2, 1) == 4
    # Idle: 4 → 1 after the down delay (never straight to 0), then 1 → 0 after another.
    s2.observe(3.0, 0); assert s2.decide(3.0, 4) == 4
    s2.observe(6.0, 0); assert s2.decide(6.0, 4) == 1
    s2.observe(6.1, 0); assert s2.decide(6.1, 1) == 1
    s2.observe(9.1, 0); assert s2.decide(9.1, 1) == 0
    # Bounds hold whatever the load.
    s3 = Autoscaler(AutoscalingConfig(1, 2, 1, 0.0, 0.0), look_back_s=0.0)
    s3.observe(0.0, 50); assert s3.decide(0.0, 1) == 2
    s3.observe(1.0, 0); assert s3.decide(1.0, 2) == 1


def test_replicas_that_cannot_start_are_reported(tmp_path, capsys):
    """A folder with no checkpoint: every replica fails to load it; after three failed starts the
    router stops trying and says why (the replica's own message), before it ever listens."""
    assert main(["serve", str(tmp_path / "missing"), "--replicas", "2", "--port", "0"]) == 2
    assert "no such run" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--replicas", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "failed to start" in err and "3 replicas in a row" in err and "checkpoint" in err.lower()

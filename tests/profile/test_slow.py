"""The testing slow-down: extra work in proportion to each layer's forward and each backward pass,
only in the phases asked for, and gone after remove()."""

from __future__ import annotations

import time

import pytest
import torch

import plait.profile.slow as slow
from plait.errors import ConfigError
from plait.models import GPT
from tests.helpers import tiny_model_config


def _step(model: torch.nn.Module) -> tuple[float, float]:
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    _, loss = model(x, x)
    t1 = time.perf_counter()
    loss.backward()
    return t1 - t0, time.perf_counter() - t1


def test_extra_time_follows_the_work_of_each_phase():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=3))
    _step(model)  # warm
    knob = slow.SlowDown(model, factor=3.0, phase="compute")
    forward_s, backward_s = _step(model)
    asked = knob.requested
    # (factor − 1) × the layers' forwards, which lie inside the whole (stretched) forward ...
    assert 0 < asked["forward"] <= 2.0 * forward_s
    assert forward_s >= asked["forward"] - slow.MIN_STALL_S  # ... and was paid (pooled) in it
    # ... and 2 × the backward pass's own duration, paid before backward returns.
    assert 0 < asked["backward"] and backward_s >= 1.5 * asked["backward"] - slow.MIN_STALL_S
    knob.remove()
    before = dict(asked)
    _step(model)
    assert knob.requested == before


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_only_the_chosen_phase_is_slowed(phase):
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=3))
    knob = slow.SlowDown(model, factor=2.0, phase=phase)
    _step(model)
    other = "backward" if phase == "forward" else "forward"
    assert knob.requested[phase] > 0 and knob.requested[other] == 0
    with torch.no_grad():  # evaluation: no backward to stretch
        x = torch.zeros(1, 4, dtype=torch.long)
        model(x, x)
    assert knob.requested["backward"] == (knob.requested["backward"] if phase == "backward" else 0)


def test_short_stalls_are_pooled_and_overshoots_deducted(monkeypatch):
    slept: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(slow.time, "perf_counter", lambda: clock[0])

    def sleep(seconds: float) -> None:  # every sleep overshoots by 1 ms
        slept.append(seconds)
        clock[0] += seconds + 0.001

    monkeypatch.setattr(slow, "stall", sleep)
    knob = slow.SlowDown(GPT(tiny_model_config()), factor=2.0)
    for _ in range(10):
        knob._pay(0.0005, "forward")  # 0.5 ms each: pooled into 2 ms stalls
    assert slept == pytest.approx([0.002, 0.002])  # two stalls, not ten
    # The first stall's overshoot delayed the second: time stalled = asked - what is still owed.
    assert knob.requested["forward"] == pytest.approx(0.005)
    assert clock[0] == pytest.approx(0.005 - knob._debt) and abs(knob._debt) <= slow.MIN_STALL_S


def test_bad_knob_values_name_the_field():
    model = GPT(tiny_model_config())
    with pytest.raises(ConfigError, match="profile.slow_factor"):
        slow.SlowDown(model, 0.5)
    with pytest.raises(ConfigError, match="profile.slow_phase"):
        slow.SlowDown(model, 2.0, "optimizer")


def test_stall_holds_the_rank_for_the_time_asked():
    t0 = time.perf_counter()
    slow.stall(0.01)
    assert time.perf_counter() - t0 >= 0.01

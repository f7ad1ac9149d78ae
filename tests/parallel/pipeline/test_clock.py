"""Pipeline step timing: the host clock on the CPU; on CUDA, events on the compute stream read once
per step (no host synchronisation per action), so bubble figures time the device's work rather
than the host's kernel launches."""

from __future__ import annotations

import time

import pytest
import torch

from plait.parallel.pipeline import runtime
from plait.parallel.pipeline.runtime import StepClock


def test_host_clock_times_intervals_from_the_first_mark():
    clock = StepClock(torch.device("cpu"))
    assert clock.resolve() == []
    a = clock.mark()
    time.sleep(0.02)
    b = clock.mark()
    t = clock.resolve()
    assert (a, b) == (0, 1)
    assert t[0] == 0.0 and 0.02 <= t[1] < 1.0


class _FakeEvent:
    """Stands in for torch.cuda.Event: a device time set at record(), counted synchronisations."""

    now_ms = 0.0
    synchronized = 0

    def __init__(self, enable_timing: bool = False):
        assert enable_timing, "events that are not timing events cannot be read"
        self.at_ms: float | None = None
        self.stream = None

    def record(self, stream=None) -> None:
        self.at_ms, self.stream = _FakeEvent.now_ms, stream

    def synchronize(self) -> None:
        _FakeEvent.synchronized += 1

    def elapsed_time(self, end: "_FakeEvent") -> float:
        assert _FakeEvent.synchronized, "elapsed_time before the step's events were waited for"
        return end.at_ms - self.at_ms


def test_cuda_clock_records_events_and_synchronises_once(monkeypatch):
    """The CUDA branch, with torch.cuda's event and stream replaced, so it runs on any machine."""
    monkeypatch.setattr(runtime.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(runtime.torch.cuda, "current_stream", lambda device=None: ("stream", device))
    monkeypatch.setattr(_FakeEvent, "synchronized", 0)
    device = torch.device("cuda", 1)
    clock = StepClock(device)
    for ms in (5.0, 7.5, 12.0):  # device times the stream reaches each mark
        _FakeEvent.now_ms = ms
        clock.mark()
    assert _FakeEvent.synchronized == 0  # marking never waits for the device
    assert all(e.stream == ("stream", device) for e in clock._marks)
    assert clock.resolve() == pytest.approx([0.0, 0.0025, 0.007])  # seconds, from the first mark
    assert _FakeEvent.synchronized == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_clock_times_device_work():
    device = torch.device("cuda")
    x = torch.randn(2048, 2048, device=device)
    clock = StepClock(device)
    clock.mark()
    for _ in range(20):
        x = x @ x / 2048
    clock.mark()
    t = clock.resolve()
    assert t[1] > 0.0

"""The scaling decision, as Ray Serve's default request-based policy makes it.

Every tick the router samples its ongoing requests (in flight at replicas plus waiting for one);
the wanted replica count is ceil(mean over the look-back window / target_ongoing_requests),
clamped to [min_replicas, max_replicas]. A change waits for its delay: the wanted count must stay
above the current target for `upscale_delay_s` (below it for `downscale_delay_s`) before the
target moves to the count wanted at that moment. Scaling down stops at one replica unless the
count wanted is zero and the target is one (1 → 0 only). From zero, a request starts one
replica at once.
"""

from __future__ import annotations

import collections
import math

from plait.serve.router.config import AutoscalingConfig


class Autoscaler:
    """Feed `observe(now, ongoing)` every tick; `decide(now, target)` gives the new target."""

    def __init__(self, config: AutoscalingConfig, look_back_s: float = 1.0):
        config.check()
        self.config = config
        self.look_back_s = look_back_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._since: float | None = None  # when the wanted count first moved away from the target
        self._direction = 0  # +1 wanting more replicas, -1 fewer, 0 content

    def observe(self, now: float, ongoing: float) -> None:
        self._samples.append((now, ongoing))
        while self._samples and self._samples[0][0] < now - self.look_back_s:
            self._samples.popleft()

    @property
    def ongoing(self) -> float:
        """Mean ongoing requests over the look-back window."""
        return sum(n for _, n in self._samples) / len(self._samples) if self._samples else 0.0

    def wanted(self, ongoing: float | None = None) -> int:
        c = self.config
        load = self.ongoing if ongoing is None else ongoing
        return min(c.max_replicas, max(c.min_replicas, math.ceil(load / c.target_ongoing_requests - 1e-9)))

    def decide(self, now: float, target: int, waiting: int = 0) -> int:
        """The target replica count after this tick (`target` if unchanged). `waiting`: requests
        held at the router for want of any replica, which at zero replicas scale up at once."""
        c = self.config
        if target == 0 and waiting > 0:  # cold start: one replica, no delay (Ray Serve's fast path)
            self._reset()
            return 1
        wanted = self.wanted()
        if wanted > target:
            direction, delay = 1, c.upscale_delay_s
        elif wanted < target:
            direction, delay = -1, c.downscale_delay_s
            if target > 1:
                wanted = max(1, wanted)  # to zero only from one replica
        else:
            self._reset()
            return target
        if direction != self._direction:
            self._direction, self._since = direction, now
        if now - self._since + 1e-6 >= delay:
            self._reset()
            return wanted
        return target

    def _reset(self) -> None:
        self._direction, self._since = 0, None

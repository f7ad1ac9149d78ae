"""How many replicas the router keeps: a fixed count, or bounds and a target load (autoscaling)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.errors import ConfigError


@dataclass
class AutoscalingConfig:
    """Ray Serve's `autoscaling_config`, by its keys and meaning (and its defaults).

    The router keeps between `min_replicas` and `max_replicas` replicas, aiming at
    `target_ongoing_requests` requests in flight (queued or running) per replica: the wanted count
    is ceil(ongoing requests / target). It scales up once that count has stayed above the current
    one for `upscale_delay_s`, down once it has stayed below for `downscale_delay_s`.
    `min_replicas = 0` scales to zero; a request that arrives then starts a replica at once.
    `dataclasses.asdict` of it is a valid Ray Serve autoscaling_config.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def check(self) -> None:
        """Raise ConfigError naming the field (and its `plait serve` flag) at fault."""
        def whole(name: str, value: object, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} (--{name.replace('_', '-')}) must be an integer ≥ {low}")

        def number(name: str, value: object, positive: bool) -> None:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (value <= 0 if positive else value < 0):
                raise ConfigError(f"{name}={value!r} (--{name.replace('_', '-')}) must be a "
                                  f"{'positive' if positive else 'non-negative'} number of "
                                  f"{'requests' if positive else 'seconds'}")

        whole("min_replicas", self.min_replicas, 0)
        whole("max_replicas", self.max_replicas, 1)
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas} "
                              "(--min-replicas ≤ --max-replicas)")
        number("target_ongoing_requests", self.target_ongoing_requests, positive=True)
        number("upscale_delay_s", self.upscale_delay_s, positive=False)
        number("downscale_delay_s", self.downscale_delay_s, positive=False)


@dataclass
class RouterConfig:
    """Settings of the router itself (not of its replicas).

    replicas: a fixed count (ignored when `autoscaling` is set). health_interval_s: how often a
    ready replica's /health is asked; health_failures in a row mark it dead (it is killed and
    replaced). A replica's exit is seen at once, as is a connection that fails. max_attempts:
    replicas a request may try before it fails (a request that kills every replica it meets is
    not retried forever). start_timeout_s: a replica that is not ready by then is replaced;
    start_failures replicas in a row failing to start stop the router's restarts (the error
    is reported). drain_timeout_s: how long a replica removed by a scale-down may finish its
    requests. look_back_s: the autoscaler averages ongoing requests over this window, sampled
    every tick_s.
    """

    replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    health_interval_s: float = 1.0
    health_failures: int = 3
    max_attempts: int = 4
    start_timeout_s: float = 120.0
    start_failures: int = 3
    drain_timeout_s: float = 120.0
    look_back_s: float = 1.0
    tick_s: float = 0.1

    def check(self) -> None:
        if self.autoscaling is not None:
            self.autoscaling.check()
        elif isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas!r} (--replicas) must be an integer ≥ 1; for "
                              "scale to zero use --min-replicas 0 with --max-replicas")

    @property
    def initial(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling is not None else self.replicas

"""The privacy accountant behind the ε a federated run reports after every round.

Rényi DP of the (Poisson-)subsampled Gaussian mechanism at integer orders (Mironov, Talwar and
Zhang, 2019), composed over rounds and converted to (ε, δ) with the conversion of Balle et al.
(2020), the one Opacus uses. Integer orders make the bound exact to compute; Opacus's accountant
on the same orders gives the same ε (tests/fl check it).

- central DP (Flower's DifferentialPrivacyServerSideFixedClipping): each round releases the sum
  of the sampled clients' clipped updates plus Gaussian noise of std z·C; a client is in a round
  with probability q = clients_per_round / clients. Flower samples a fixed number of clients
  without replacement; the Poisson bound with that q is the usual DP-FedAvg analysis.
- local DP (Flower's LocalDpMod): each client releases its clipped update with Gaussian noise of
  std C·√(2 ln(1.25/δ))/ε, a Gaussian mechanism of noise multiplier √(2 ln(1.25/δ))/ε; its
  releases compose without amplification (the client knows it took part).
"""

from __future__ import annotations

import math

import numpy as np

from plait.errors import ConfigError

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 257))


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def subsampled_gaussian_rdp(q: float, noise_multiplier: float, order: int) -> float:
    """RDP at integer `order` of one release of the Poisson-subsampled Gaussian mechanism."""
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"sampling rate {q} must be in [0, 1]")
    if noise_multiplier <= 0:
        return math.inf
    if q == 0.0:
        return 0.0
    if q == 1.0:
        return order / (2 * noise_multiplier ** 2)
    log_a = -math.inf
    for k in range(order + 1):
        log_binom = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        term = (log_binom + k * math.log(q) + (order - k) * math.log1p(-q)
                + (k * k - k) / (2 * noise_multiplier ** 2))
        log_a = _log_add(log_a, term)
    return log_a / (order - 1)


def rdp_to_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    """(ε, the order that gives it) for composed RDP values at `orders` and a target δ."""
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"fl.dp_delta={delta} must be in (0, 1)")
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def local_noise_multiplier(epsilon: float, delta: float) -> float:
    """The Gaussian noise multiplier (std / sensitivity) that Flower's LocalDpMod uses for (ε, δ)."""
    if epsilon <= 0 or not 0.0 < delta < 1.0:
        raise ConfigError(f"fl.dp_epsilon={epsilon} must be > 0 and fl.dp_delta={delta} in (0, 1)")
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class RDPAccountant:
    """Composes subsampled Gaussian releases and reports the (ε, δ) spent so far."""

    def __init__(self, orders: tuple[int, ...] = DEFAULT_ORDERS):
        if not orders or any(not isinstance(a, int) or a < 2 for a in orders):
            raise ConfigError("RDP orders must be integers ≥ 2")
        self.orders = np.asarray(orders, dtype=float)
        self.rdp = np.zeros(len(orders))
        self.releases = 0

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        """Add `count` releases of the Gaussian mechanism with this noise and sampling rate."""
        self.rdp = self.rdp + count * np.asarray(
            [subsampled_gaussian_rdp(sample_rate, noise_multiplier, int(a)) for a in self.orders])
        self.releases += count

    def epsilon(self, delta: float) -> float:
        """ε spent so far at `delta` (0 before any release)."""
        if self.releases == 0:
            return 0.0
        return rdp_to_epsilon(self.rdp, self.orders, delta)[0]

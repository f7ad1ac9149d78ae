"""Flower's strategies, used as they are, built from the [fl] section.

FedAvg, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan come from
`flwr.serverapp.strategy`; central DP wraps any of them in Flower's
DifferentialPrivacyServerSideFixedClipping. FedBuff (plait.fl.fedbuff) is not a round-based
strategy and is built by the server instead.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from plait.config import Config
from plait.errors import ConfigError
from plait.fl.worker import UNIT_WEIGHT
from plait.fl.records import WEIGHT

ROUND_BASED = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum",
               "multikrum", "bulyan")


def per_round(cfg: Config) -> int:
    """Clients sampled each round."""
    return cfg.fl.clients_per_round or cfg.fl.clients


def weight_key(cfg: Config) -> str:
    """The metric FedAvg weighs updates by: the client's sample count, or 1 for everyone under
    central DP (its noise is calibrated to one client moving the mean by at most clip / m)."""
    return UNIT_WEIGHT if cfg.fl.dp == "central" else WEIGHT


def build_strategy(cfg: Config) -> Strategy:
    """The Flower strategy of `cfg` (wrapped for central DP when fl.dp = "central")."""
    f = cfg.fl
    n, m = f.clients, per_round(cfg)
    # min_train_nodes = m makes Flower sample exactly m of the n nodes (fraction × n may round
    # down); clients are evaluated on the server's held-out split, not on their own data.
    common = dict(fraction_train=m / n, fraction_evaluate=0.0, min_train_nodes=m, min_evaluate_nodes=0,
                  min_available_nodes=n, weighted_by_key=weight_key(cfg))
    name = f.strategy
    if name == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=f.proximal_mu)
    elif name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        strategy = cls(**common, eta=f.server_lr, eta_l=f.lr, tau=f.tau)
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, beta=f.trim_beta)
    elif name == "krum":
        strategy = Krum(**common, num_malicious_nodes=f.byzantine)
    elif name == "multikrum":
        strategy = MultiKrum(**common, num_malicious_nodes=f.byzantine,
                             num_nodes_to_select=max(1, m - f.byzantine))
    elif name == "bulyan":
        strategy = Bulyan(**common, num_malicious_nodes=f.byzantine)
    else:
        raise ConfigError(f"fl.strategy={name!r} is not a round-based Flower strategy; valid: "
                          f"{', '.join(ROUND_BASED)} (fedbuff runs its own loop)")
    if f.dp == "central":
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, f.dp_noise_multiplier, f.dp_clip, m)
    return strategy

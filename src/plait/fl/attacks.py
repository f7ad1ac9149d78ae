"""The attack harness: a configurable share of clients sends poisoned updates.

- sign_flip: w_global − scale·Δ (the update reversed and amplified)
- scale: w_global + scale·Δ (a boosted update)
- nan / inf: every floating parameter NaN / +Inf (refused by the server's validation)
- label_flip: trains honestly on flipped labels (class c → C−1−c), a data-poisoning attack

Which clients attack is fixed by the seed (:func:`malicious_clients`), so a run can be repeated
and the server-side robust strategies compared on the same attackers.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.app.message_type import MessageType

from plait.errors import ConfigError
from plait.fl.records import ARRAYS, numpy_arrays

log = logging.getLogger(__name__)

ATTACKS = ("sign_flip", "scale", "nan", "inf", "label_flip")
MODEL_ATTACKS = ("sign_flip", "scale", "nan", "inf")


def malicious_clients(clients: int, share: float, seed: int) -> set[int]:
    """Partition ids of the round(share × clients) attackers, drawn with the run's seed."""
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"fl.malicious_share={share} must be in [0, 1)")
    count = int(round(share * clients))
    rng = np.random.default_rng([seed, 0xA77AC])
    return {int(i) for i in rng.choice(clients, size=count, replace=False)}


def flip_labels(n_classes: int):
    """The label-flip map y → n_classes − 1 − y."""
    return lambda y: (n_classes - 1) - y


def poison(local: dict[str, np.ndarray], sent: dict[str, np.ndarray], kind: str,
           scale: float) -> dict[str, np.ndarray]:
    """The parameters a model-poisoning client sends instead of `local`."""
    out = {}
    for k, w in local.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[k] = w
        elif kind == "sign_flip":
            out[k] = (sent[k] - scale * (w - sent[k])).astype(w.dtype)
        elif kind == "scale":
            out[k] = (sent[k] + scale * (w - sent[k])).astype(w.dtype)
        elif kind == "nan":
            out[k] = np.full_like(w, np.nan)
        elif kind == "inf":
            out[k] = np.full_like(w, np.inf)
        else:
            raise ConfigError(f"fl.attack={kind!r} is not a model-poisoning attack; valid: "
                              f"{', '.join(MODEL_ATTACKS)}")
    return out


class AttackMod:
    """A Flower client mod: an attacking client's train replies carry poisoned parameters."""

    def __init__(self, kind: str, attackers: set[int], scale: float):
        if kind not in MODEL_ATTACKS:
            raise ConfigError(f"fl.attack={kind!r} is invalid here; valid: {', '.join(MODEL_ATTACKS)}")
        self.kind, self.attackers, self.scale = kind, attackers, scale

    def __call__(self, msg: Message, ctxt: Context, call_next) -> Message:
        reply = call_next(msg, ctxt)
        pid = int(ctxt.node_config.get("partition-id", -1))
        if (pid not in self.attackers or msg.metadata.message_type != MessageType.TRAIN
                or reply.has_error() or ARRAYS not in reply.content.array_records):
            return reply
        sent = numpy_arrays(msg.content.array_records[ARRAYS])
        local = numpy_arrays(reply.content.array_records[ARRAYS])
        bad = poison(local, sent, self.kind, self.scale)
        reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in bad.items()})
        log.debug("client %d sends a %s update", pid, self.kind)
        return reply


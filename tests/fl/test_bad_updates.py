"""Every bad client update is refused and logged, the round goes on with the others, nothing crashes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from plait.fl.client import build_client_app
from plait.fl.compress import SCHEME, UpdateDecodeError, decode_update
from plait.fl.records import ARRAYS, METRICS
from plait.fl.runner import run_local
from plait.fl.validation import check_update
from tests.fl.support import digits_config

BAD = 3  # the partition id whose replies are corrupted


def _corrupt(kind):
    def arrays(a: dict) -> dict:
        k0 = next(iter(a))
        if kind == "shape":
            a[k0] = a[k0][:, :-1].copy()
        elif kind == "dtype":
            a[k0] = a[k0].astype(np.float64)
        elif kind == "nan":
            a[k0] = a[k0].copy(); a[k0].flat[0] = np.nan
        elif kind == "inf":
            a[k0] = a[k0].copy(); a[k0].flat[-1] = np.inf
        elif kind == "missing":
            del a[k0]
        elif kind == "extra":
            a["surprise"] = np.zeros(3, dtype=np.float32)
        return a

    def mod(msg, ctxt, call_next):
        reply = call_next(msg, ctxt)
        if int(ctxt.node_config["partition-id"]) != BAD or reply.has_error():
            return reply
        if kind == "raise":
            raise RuntimeError("the client crashed")
        if kind == "weight":
            reply.content[METRICS] = MetricRecord({"num-examples": -5})
            return reply
        if kind == "topk_indices":
            # float16 values, uint16 indices (the model is small): the last index is past its end
            payload = np.concatenate([np.ones(4, np.float16).view(np.uint8),
                                      np.array([0, 1, 2, 65_000], np.uint16).view(np.uint8)])
            reply.content[ARRAYS] = ArrayRecord({"update": Array(payload)})
            reply.content[SCHEME] = ConfigRecord({"kind": "topk", "rank": 1})
            return reply
        a = dict(zip(reply.content[ARRAYS].keys(), reply.content[ARRAYS].to_numpy_ndarrays()))
        reply.content[ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays(a).items()})
        return reply

    return mod


@pytest.mark.parametrize("kind, why", [
    ("shape", "has shape"), ("dtype", "has dtype"), ("nan", "NaN/Inf"), ("inf", "NaN/Inf"),
    ("missing", "parameter names differ"), ("extra", "parameter names differ"),
    ("weight", "positive finite"), ("raise", "client error"), ("topk_indices", "compressed update refused"),
])
def test_a_bad_update_is_refused_and_logged_and_the_round_goes_on(kind, why, caplog):
    cfg = digits_config(rounds=1)
    app = build_client_app(cfg, outer_mods=[_corrupt(kind)])
    with caplog.at_level(logging.WARNING, logger="plait.fl"):
        result = run_local(cfg, client_app=app)
    row = result.history[1]
    assert row["accepted"] == 9 and row["refused"] == 1 and row["aggregated"]
    assert why in row["refused_reasons"][0] and f"node {100 + BAD}" in row["refused_reasons"][0]
    assert any(why in r.getMessage() for r in caplog.records)
    assert row["accuracy"] != result.history[0]["accuracy"]  # the others' updates were aggregated
    assert all(np.isfinite(v).all() for v in result.final.values())


def test_check_update_accepts_a_good_update_and_names_what_is_wrong():
    ref = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})
    good = RecordDict({ARRAYS: ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}),
                       METRICS: MetricRecord({"num-examples": 4})})
    assert check_update(good, ref) is None
    two = RecordDict({ARRAYS: ref, "other": ref, METRICS: MetricRecord({"num-examples": 4})})
    assert "one ArrayRecord" in check_update(two, ref)
    unweighted = RecordDict({ARRAYS: ref, METRICS: MetricRecord({"loss": 1.0})})
    assert "num-examples" in check_update(unweighted, ref)


@pytest.mark.parametrize("payload, scheme, match", [
    (np.zeros(7, np.uint8), {"kind": "topk", "rank": 1}, "4 bytes an entry"),
    (np.zeros(7, np.uint8), {"kind": "topk", "rank": 1, "values": "float32"}, "6 bytes an entry"),
    (np.zeros(8, np.uint8), {"kind": "topk", "rank": 1, "values": "int8"}, "top-k values 'int8' unknown"),
    (np.concatenate([np.array([np.inf], np.float16).view(np.uint8), np.array([1], np.uint16).view(np.uint8)]),
     {"kind": "topk", "rank": 1}, "must be finite"),
    (np.zeros(5, np.float32), {"kind": "powersgd", "rank": 1}, "float32 × 6"),
    (np.zeros(6, np.float32), {"kind": "zip", "rank": 1}, "unknown compression"),
])
def test_malformed_compressed_payloads_are_refused(payload, scheme, match):
    ref = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})
    content = RecordDict({ARRAYS: ArrayRecord({"update": Array(payload)}), SCHEME: ConfigRecord(scheme)})
    with pytest.raises(UpdateDecodeError, match=match):
        decode_update(content, ref)

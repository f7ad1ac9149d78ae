"""Compressed client updates (top-k / PowerSGD with error feedback) and FedBuff."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType

from plait.fl.compress import ERROR_FEEDBACK, SCHEME, CompressionMod, decode_update
from plait.fl.fedbuff import staleness_weight
from plait.fl.records import ARRAYS, METRICS
from plait.fl.runner import run_local, task_identity
from tests.fl.support import digits_config

rng = np.random.default_rng(0)
REF = {"w": rng.standard_normal((32, 16)).astype(np.float32), "b": rng.standard_normal(16).astype(np.float32)}
LOCAL = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in REF.items()}


def _round_trip(mod: CompressionMod, ctx: Context, local: dict) -> tuple[dict, RecordDict]:
    with task_identity(1):
        sent = Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in REF.items()})}), 7, MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m"

    def app(msg, _ctx):
        return Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in local.items()}),
                                   METRICS: MetricRecord({"num-examples": 1})}), reply_to=msg)

    reply = mod(sent, ctx, app)
    content = reply.content
    full = decode_update(content, ArrayRecord({k: Array(v) for k, v in REF.items()}))
    return dict(zip(full.keys(), full.to_numpy_ndarrays())), content


def _ctx():
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_topk_sends_the_largest_entries_and_keeps_the_rest_as_error_feedback():
    ctx = _ctx()
    got, content = _round_trip(CompressionMod("topk", ratio=0.05), ctx, LOCAL)
    delta = np.concatenate([(LOCAL[k] - REF[k]).ravel() for k in REF])
    sent = np.concatenate([(got[k] - REF[k]).ravel() for k in REF])
    k = int(np.ceil(0.05 * delta.size))
    assert np.count_nonzero(sent) == k
    assert np.abs(delta[sent != 0]).min() >= np.abs(delta[sent == 0]).max()
    # float16 values and uint16 indices (528 parameters): 4 bytes an entry
    assert content[ARRAYS]["update"].numpy().nbytes == 4 * k and SCHEME in content.config_records
    error = np.concatenate([v.ravel() for v in ctx.state[ERROR_FEEDBACK].to_numpy_ndarrays()])
    np.testing.assert_allclose(sent + error, delta, atol=1e-6)  # nothing lost: sent + kept = update
    assert 0 < np.abs(error[sent != 0]).max() < 1e-2  # the float16 rounding is kept too
    # Next round, with no new change, the kept remainder is what gets sent (float32: exactly).
    again, _ = _round_trip(CompressionMod("topk", ratio=1.0, values="float32"), ctx, REF)
    np.testing.assert_allclose(np.concatenate([(again[k] - REF[k]).ravel() for k in REF]), error, atol=1e-6)


def test_topk_indices_widen_past_65536_parameters():
    from plait.fl.compress import index_dtype

    assert index_dtype(2 ** 16) is np.uint16 and index_dtype(2 ** 16 + 1) is np.uint32


def test_powersgd_sends_factors_and_their_residual_is_kept():
    ctx = _ctx()
    got, content = _round_trip(CompressionMod("powersgd", rank=2), ctx, LOCAL)
    assert content[ARRAYS]["update"].numpy().size == (32 + 16) * 2 + 16
    np.testing.assert_allclose(got["b"], LOCAL["b"], atol=1e-6)  # vectors go whole
    approx = got["w"] - REF["w"]
    assert np.linalg.matrix_rank(approx, tol=1e-4) == 2
    error = dict(zip(ctx.state[ERROR_FEEDBACK].keys(), ctx.state[ERROR_FEEDBACK].to_numpy_ndarrays()))
    np.testing.assert_allclose(approx + error["w"], LOCAL["w"] - REF["w"], atol=1e-5)


@pytest.mark.parametrize("kind, extra, most", [("topk", {"topk_ratio": 0.05}, 0.15),
                                               ("powersgd", {"powersgd_rank": 2}, 0.4)])
def test_compressed_runs_upload_less_and_still_learn(kind, extra, most):
    plain = run_local(digits_config(rounds=3))
    packed = run_local(digits_config(rounds=6, compression=kind, **extra))
    ratio = packed.history[1]["upload_wire_bytes"] / plain.history[1]["upload_wire_bytes"]
    assert ratio < most  # this 1,210-parameter model pays 128 header bytes per array
    assert packed.history[-1]["accuracy"] > packed.history[0]["accuracy"] + 0.1


def test_staleness_weight_is_fedbuffs():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == pytest.approx(0.5)


def test_fedbuff_steps_without_waiting_for_slow_clients():
    cfg = digits_config(strategy="fedbuff", rounds=6, buffer_size=3, concurrency=10, slow_clients=0.3,
                        slowdown=3.0, max_staleness=4)
    buff = run_local(cfg)
    sync = run_local(digits_config(rounds=2, slow_clients=0.3, slowdown=3.0))
    assert [r["round"] for r in buff.history] == list(range(7))
    assert all(r["accepted"] == 3 for r in buff.history[1:])
    assert buff.extra["max_staleness_seen"] >= 1
    # Six buffered steps of three updates take less clock than two synchronous rounds of ten.
    assert buff.history[-1]["time"] < sync.history[-1]["time"]
    assert buff.history[-1]["accuracy"] > buff.history[0]["accuracy"] + 0.1


def test_fedbuff_refuses_updates_older_than_the_staleness_bound():
    cfg = digits_config(strategy="fedbuff", rounds=6, buffer_size=2, concurrency=10, slow_clients=0.5,
                        slowdown=3.0, max_staleness=0)
    result = run_local(cfg)
    assert result.extra["stale_refused"] > 0
    reasons = [r for row in result.history for r in row.get("refused_reasons", [])]
    assert any("fl.max_staleness=0" in r for r in reasons)

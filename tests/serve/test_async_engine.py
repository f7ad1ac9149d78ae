import asyncio

from plait.serve.async_engine import Handle, match_outputs
from plait.serve.engine import RequestOutput
from plait.serve.metrics import ServeMetrics


def output(rid: str, n: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, "x", [1], finished, "length" if finished else None, 4, n)


def test_first_tokens_are_delivered_before_the_steps_other_tokens():
    loop = asyncio.new_event_loop()
    try:
        handles = {rid: Handle(rid, asyncio.Queue(), loop) for rid in ("a", "b", "new", "gone")}
        for rid in ("a", "b"):
            handles[rid].first_token = 0.0  # already streaming
        del handles["gone"]  # cancelled: its output is dropped
        outs = [output("a", 5), output("gone", 2), output("b", 3, finished=True), output("new", 1)]
        matched = match_outputs(handles, outs, ServeMetrics(), now=1.0)
        assert [h.request_id for h, _ in matched] == ["new", "a", "b"]
        assert handles["new"].first_token == 1.0
        assert "b" not in handles and matched[2][0].finished
    finally:
        loop.close()

"""TextStream: whole characters only, stop strings cut exactly, deltas add up to the whole."""

from __future__ import annotations

import pytest

from plait.serve.text import Bytes, TextStream


def run(text: str, stop=()) -> tuple[list[str], bool]:
    tok = Bytes()
    stream = TextStream(tok.decoder(), stop)
    deltas, stopped = [], False
    for t in tok.encode(text):
        delta, stopped = stream.push(t)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(stream.flush())
    return deltas, stopped


def test_multibyte_characters_are_released_whole():
    deltas, stopped = run("héllo → wörld")
    assert "".join(deltas) == "héllo → wörld" and not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "é" in deltas and "→" in deltas  # released at their last byte, in one piece


@pytest.mark.parametrize("text,stop,expected", [
    ("abc STOP def", ["STOP"], "abc "),
    ("abc STO", ["STOP"], "abc STO"),  # a prefix of a stop string at the end is released at flush
    ("one\n\ntwo", ["\n\n", "x"], "one"),
    ("aaab", ["ab"], "aa"),
    ("xyz", ["y", "xy"], ""),  # the earliest match wins
])
def test_stop_strings(text, stop, expected):
    deltas, _ = run(text, stop)
    assert "".join(deltas) == expected


def test_text_that_may_start_a_stop_string_is_held_back():
    tok = Bytes()
    stream = TextStream(tok.decoder(), ["END"])
    assert [stream.push(t)[0] for t in tok.encode("aE")] == ["a", ""]
    assert stream.push(ord("x")) == ("Ex", False)

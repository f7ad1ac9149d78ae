"""Corpora and packed datasets: built-in corpus builder, user files, and bad paths."""

from __future__ import annotations

import numpy as np
import pytest

from plait.data.corpus import build_builtin_corpus, builtin_corpus, load_text, stdlib_docstrings
from plait.data.dataset import TokenDataset, load_token_splits, split_tokens
from plait.data.tokenizer import ByteTokenizer
from plait.errors import DataError
from tests.helpers import tiny_text


def fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text(
        '"""A module docstring that is long enough to be kept in the corpus."""\n'
        'def f():\n    """A function docstring that is also long enough to be kept."""\n'
        'def g():\n    """short"""\n')
    (root / "test").mkdir()
    (root / "test" / "t.py").write_text('"""Tests are skipped even with a long enough docstring."""\n')
    (root / "broken.py").write_text("def (:\n")
    return root


def test_docstrings_are_collected_in_order_and_tests_skipped(tmp_path):
    docs = stdlib_docstrings(fake_stdlib(tmp_path / "lib"))
    assert docs == ["A module docstring that is long enough to be kept in the corpus.",
                    "A function docstring that is also long enough to be kept."]


def test_builtin_corpus_is_built_once_and_cached(tmp_path, monkeypatch):
    lib = fake_stdlib(tmp_path / "lib")
    import plait.data.corpus as corpus
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    path = builtin_corpus(tmp_path / "cache")
    text = path.read_text()
    assert "A module docstring" in text and text == build_builtin_corpus(lib)
    mtime = path.stat().st_mtime_ns
    assert builtin_corpus(tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime


def test_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    s = "naïve café — ok\n"
    assert tok.decode(tok.encode(s)) == s


def test_user_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha ")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("beta")
    (sub / "skip.md").write_text("not text")
    assert load_text(tmp_path / "a.txt") == "alpha "
    assert load_text(tmp_path) == "alpha \n\nbeta"


@pytest.mark.parametrize("setup,msg", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .txt files"),
    (lambda p: (p / "blank.txt").write_text("  \n") and p / "blank.txt", "holds no text"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe\x00") and p / "bin.txt", "not UTF-8"),
])
def test_bad_corpus_paths(tmp_path, setup, msg):
    with pytest.raises(DataError, match=msg):
        load_text(setup(tmp_path))


def test_too_little_text_for_a_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("tiny text")
    with pytest.raises(DataError, match="block_size"):
        load_token_splits(str(tmp_path / "short.txt"), block_size=64, val_fraction=0.1)


def test_packed_windows_and_split(tmp_path):
    tokens = np.arange(101, dtype=np.uint8)
    ds = TokenDataset(tokens, block_size=10)
    assert len(ds) == 10
    x, y = ds.batch([0, 3])
    assert x[1].tolist() == list(range(30, 40)) and y[1].tolist() == list(range(31, 41))
    train, val = split_tokens(tokens, 0.1)
    assert len(val) == 10 and np.array_equal(np.concatenate([train, val]), tokens)
    (tmp_path / "c.txt").write_text(tiny_text(2000))
    tr, va = load_token_splits(str(tmp_path / "c.txt"), 16, 0.1)
    assert len(tr) > 9 * len(va) > 0

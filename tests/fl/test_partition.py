"""Partitioners: every item used once, the promised label skew, fixed by the seed."""

from __future__ import annotations

import numpy as np
import pytest

from plait.errors import ConfigError, DataError
from plait.fl.partition import document_labels, partition, partition_report, split_documents

LABELS = np.repeat(np.arange(10), 50)


def _covers_once(parts, n):
    joined = np.concatenate(parts)
    return len(joined) == n and len(np.unique(joined)) == n


def test_iid_splits_evenly_and_covers_every_item():
    parts = partition(LABELS, 7, "iid", seed=1)
    assert _covers_once(parts, len(LABELS))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_k_labels_gives_each_client_exactly_k_classes():
    parts = partition(LABELS, 20, "labels", k=2, seed=0)
    assert _covers_once(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    report = partition_report(parts, LABELS)
    assert sum(r["size"] for r in report) == len(LABELS) and all(len(r["labels"]) == 2 for r in report)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    def mean_classes(alpha):
        parts = partition(LABELS, 10, "dirichlet", alpha=alpha, seed=0)
        assert _covers_once(parts, len(LABELS))
        return np.mean([len(np.unique(LABELS[p])) for p in parts])

    assert mean_classes(0.1) < mean_classes(100.0)
    assert mean_classes(100.0) == 10


def test_the_seed_fixes_the_split():
    a = partition(LABELS, 5, "dirichlet", alpha=0.5, seed=3)
    b = partition(LABELS, 5, "dirichlet", alpha=0.5, seed=3)
    c = partition(LABELS, 5, "dirichlet", alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kind, kwargs, error, field", [
    ("zipf", {}, ConfigError, "fl.partition"),
    ("labels", {"k": 11}, ConfigError, "fl.labels_per_client"),
    ("dirichlet", {"alpha": 0.0}, ConfigError, "fl.dirichlet_alpha"),
])
def test_bad_partition_settings_name_the_field(kind, kwargs, error, field):
    with pytest.raises(error, match=field):
        partition(LABELS, 5, kind, **kwargs)


def test_more_clients_than_items_is_refused():
    with pytest.raises(DataError, match="fl.clients"):
        partition(LABELS[:3], 5, "iid")


def test_text_documents_and_their_labels():
    text = "Return the sum.\n\nReturn a copy.\n\nCreate a thing.\n\n\n\nOther words here."
    docs = split_documents(text)
    assert docs == ["Return the sum.", "Return a copy.", "Create a thing.", "Other words here."]
    labels = document_labels(docs, n_labels=3)
    assert labels[0] == labels[1] != labels[2] and labels[3] == 2  # the catch-all label
    parts = partition(labels, 2, "labels", k=2, seed=0)  # 2 × 2 ≥ 3 classes: all held
    assert _covers_once(parts, 4)

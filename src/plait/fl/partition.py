"""How the data is spread over clients: IID, Dirichlet(α) label skew, k labels per client.

Every partitioner takes the labels of the items to split (digit classes, or a text document's
label from :func:`document_labels`) and returns one array of item indices per client, the same for
the same seed on every machine: a SuperNode rebuilds its own partition from the seed and its
partition id, and the in-process runner and Flower's simulation runtime see the same splits.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from plait.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTITIONS = ("iid", "dirichlet", "labels")
DIRICHLET_TRIES = 100


def iid(labels: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into `clients` nearly equal parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
              min_items: int = 1) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients in proportions drawn from Dir(α).

    Small α gives each client few classes; large α tends to IID. Draws are repeated (a bounded
    number of times) until every client holds at least `min_items` items, as is usual.
    """
    if alpha <= 0:
        raise ConfigError(f"fl.dirichlet_alpha={alpha} must be > 0")
    classes = np.unique(labels)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            items = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(items)).astype(int)
            for client, chunk in enumerate(np.split(items, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_items:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(f"a Dirichlet(α={alpha}) split of {len(labels)} items over {clients} clients left a "
                    f"client with fewer than {min_items} items in {DIRICHLET_TRIES} draws; raise "
                    "fl.dirichlet_alpha or lower fl.clients")


def k_labels(labels: np.ndarray, clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client holds exactly `k` classes (McMahan et al.'s pathological non-IID split).

    Classes go to clients least-used first (ties broken at random), so every class is held by
    some client when clients × k ≥ classes; a class's items are split evenly among its holders.
    """
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ConfigError(f"fl.labels_per_client={k} must be in [1, {len(classes)}] (the classes present)")
    use = Counter({int(c): 0 for c in classes})
    held: list[list[int]] = []
    for _ in range(clients):
        order = sorted(use, key=lambda c: (use[c], rng.random()))
        mine = order[:k]
        for c in mine:
            use[c] += 1
        held.append(mine)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in classes:
        holders = [i for i, mine in enumerate(held) if int(c) in mine]
        if not holders:
            continue
        items = rng.permutation(np.flatnonzero(labels == c))
        for holder, chunk in zip(holders, np.array_split(items, len(holders))):
            parts[holder].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition(labels: np.ndarray, clients: int, kind: str, *, alpha: float = 0.5, k: int = 2,
              seed: int = 0) -> list[np.ndarray]:
    """Item indices per client for `kind` ("iid", "dirichlet" or "labels"); every client gets ≥ 1."""
    labels = np.asarray(labels)
    if clients < 1:
        raise ConfigError(f"fl.clients={clients} must be ≥ 1")
    if len(labels) < clients:
        raise DataError(f"{len(labels)} items cannot be split over fl.clients={clients} clients; "
                        "use fewer clients or more data")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = iid(labels, clients, rng)
    elif kind == "dirichlet":
        parts = dirichlet(labels, clients, alpha, rng)
    elif kind == "labels":
        parts = k_labels(labels, clients, k, rng)
    else:
        raise ConfigError(f"fl.partition={kind!r} is invalid; valid: {', '.join(PARTITIONS)}")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(f"fl.partition={kind!r} left client {empty[0]} without data ({len(labels)} items, "
                        f"{clients} clients); use fewer clients or another partition")
    return parts


def partition_report(parts: list[np.ndarray], labels: np.ndarray) -> list[dict]:
    """Per client: its size and how many items of each label it holds."""
    labels = np.asarray(labels)
    return [{"client": i, "size": int(len(p)),
             "labels": {int(c): int(n) for c, n in zip(*np.unique(labels[p], return_counts=True))}}
            for i, p in enumerate(parts)]


# --- text: documents and their labels ---------------------------------------------------------


def split_documents(text: str, min_chars: int = 1) -> list[str]:
    """Blank-line separated documents (the built-in corpus joins its documents that way)."""
    return [d for d in (part.strip() for part in text.split("\n\n")) if len(d) >= min_chars]


def document_labels(documents: list[str], n_labels: int = 10) -> np.ndarray:
    """A label per document for label-skewed text splits: its first word, if that is one of the
    `n_labels - 1` most common first words (e.g. "Return", "Create"), else the catch-all last label.

    A document's first word marks its kind (accessor docs, constructors, reference topics, ...),
    so clients that hold few labels hold few kinds of text.
    """
    if n_labels < 2:
        raise ConfigError(f"n_labels={n_labels} must be ≥ 2")
    first = [d.split(maxsplit=1)[0] if d.split() else "" for d in documents]
    common = [w for w, _ in Counter(first).most_common(n_labels - 1)]
    index = {w: i for i, w in enumerate(common)}
    return np.asarray([index.get(w, n_labels - 1) for w in first], dtype=np.int64)

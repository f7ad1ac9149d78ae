"""What a federated run trains: the plait model of `[model]` and each client's share of `[data]`.

Every process (the server, each client, a SuperNode) rebuilds the same model and the same
partition from the config and its seed, so only parameters travel.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from plait.config import Config
from plait.errors import ConfigError, DataError
from plait.fl.partition import (
    document_labels,
    partition,
    partition_report,
    split_documents,
)
from plait.models.build import build_model as build_plain_model

log = logging.getLogger(__name__)

TEXT_LABELS = 10  # label groups of text documents (see partition.document_labels)


def build_model(cfg: Config) -> nn.Module:
    """The plain model named by `model.arch`, initialised from `fl.seed`."""
    return build_plain_model(cfg.model, cfg.fl.seed)


@dataclass
class FederatedData:
    """The held-out split (the server's) and the training items of every client."""

    kind: str  # "digits" or "text"
    val: Any  # a dataset with len() and batch(indices) -> (x, y)
    parts: list[np.ndarray]  # per client: indices of its samples (digits) or documents (text)
    labels: np.ndarray  # a label per training item (digit class or document label)
    source: Any  # digits: the training DigitsDataset; text: the list of training documents
    block_size: int = 0

    def client(self, index: int):
        """Client `index`'s training set: a dataset with len() and batch(indices)."""
        if not 0 <= index < len(self.parts):
            raise ConfigError(f"partition-id {index} is out of range; valid: 0..{len(self.parts) - 1}")
        items = self.parts[index]
        if self.kind == "digits":
            from plait.data.digits import DigitsDataset
            idx = torch.as_tensor(items, dtype=torch.long)
            return DigitsDataset(self.source.x[idx], self.source.y[idx])
        from plait.data.dataset import TokenDataset
        from plait.data.tokenizer import ByteTokenizer
        text = "\n\n".join(self.source[i] for i in items) + "\n"
        tokens = ByteTokenizer().encode(text)
        if (len(tokens) - 1) // self.block_size < 1:
            raise DataError(f"client {index} holds {len(tokens)} tokens, too few for one sequence of "
                            f"model.block_size={self.block_size}; use fewer fl.clients or a smaller block_size")
        return TokenDataset(tokens, self.block_size)

    def report(self) -> list[dict]:
        """Per client: its size (samples or documents) and its label counts."""
        return partition_report(self.parts, self.labels)


def load_federated_data(cfg: Config) -> FederatedData:
    """The held-out split and every client's partition, built once per process and config."""
    f, d = cfg.fl, cfg.data
    return _load(d.dataset, d.path, d.val_fraction, d.cache_dir, cfg.model.block_size, f.clients,
                 f.partition, f.dirichlet_alpha, f.labels_per_client, f.seed)


@functools.lru_cache(maxsize=4)
def _load(dataset: str, path: str, val_fraction: float, cache_dir: str, block_size: int, clients: int,
          kind: str, alpha: float, k: int, seed: int) -> FederatedData:
    if clients < 2:
        raise ConfigError(f"fl.clients={clients} must be ≥ 2 for a federated run")
    if dataset == "digits":
        from plait.data.digits import load_digits_splits
        train, val = load_digits_splits(val_fraction)
        labels = train.y.numpy()
        parts = partition(labels, clients, kind, alpha=alpha, k=k, seed=seed)
        return FederatedData("digits", val, parts, labels, train)
    from plait.data.corpus import load_text
    from plait.data.dataset import TokenDataset
    from plait.data.tokenizer import ByteTokenizer
    text = load_text(path, cache_dir or None)
    # Hold out the tail of the text (as plait train does); the clients split the documents before it.
    cut = int(len(text) * (1.0 - val_fraction))
    documents = split_documents(text[:cut], min_chars=block_size // 4)
    labels = document_labels(documents, TEXT_LABELS)
    parts = partition(labels, clients, kind, alpha=alpha, k=k, seed=seed)
    val = TokenDataset(ByteTokenizer().encode(text[cut:]), block_size)  # DataError if too short
    return FederatedData("text", val, parts, labels, documents, block_size)

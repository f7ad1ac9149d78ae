"""plait models and Flower records: parameters as ArrayRecords, and what an upload weighs."""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn
from flwr.app import ArrayRecord

ARRAYS = "arrays"  # the key Flower's strategies read parameters from (their arrayrecord_key)
METRICS = "metrics"
WEIGHT = "num-examples"  # FedAvg's weight: the client's training set size


def model_arrays(model: nn.Module) -> ArrayRecord:
    """The model's parameters and buffers (a copy), in state-dict order."""
    return ArrayRecord(model.state_dict())


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load an ArrayRecord made by :func:`model_arrays` into `model`."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def numpy_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the tensors themselves (elements × element size), framing not counted."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())


def wire_bytes(arrays: ArrayRecord) -> int:
    """Bytes Flower serialises for the record (each array's data with its header)."""
    return int(arrays.count_bytes())

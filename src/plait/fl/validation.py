"""What makes a client's update acceptable: the server's parameters' keys, shapes and dtypes,
finite values, and a positive finite weight. Anything else is refused with the reason."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from plait.fl.records import ARRAYS, WEIGHT


def check_update(content: RecordDict, reference: ArrayRecord, weight_key: str = WEIGHT) -> str | None:
    """None when `content` is a well-formed update of `reference`'s parameters, else why not."""
    records = content.array_records
    if list(records) != [ARRAYS]:
        return f"expected one ArrayRecord {ARRAYS!r}, got {sorted(records) or 'none'}"
    arrays = records[ARRAYS]
    if list(arrays.keys()) != list(reference.keys()):
        missing = sorted(set(reference.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference.keys()))
        return f"parameter names differ from the server's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, ref in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"{name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"{name!r} has dtype {got.dtype}, expected {ref.dtype}"
    for name, value in zip(arrays.keys(), arrays.to_numpy_ndarrays()):
        if value.shape != tuple(reference[name].shape):  # the data disagrees with its own header
            return f"{name!r} holds {value.shape} data, expected {tuple(reference[name].shape)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            return f"{name!r} holds {bad} NaN/Inf value(s)"
    metrics = [m for m in content.metric_records.values() if weight_key in m]
    if len(metrics) != 1:
        return f"expected one MetricRecord with {weight_key!r}"
    weight = metrics[0][weight_key]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"{weight_key!r}={weight!r} must be a positive finite number"
    return None

"""The digits classifier and its data: shapes, the fixed held-out split, and that it learns."""

from __future__ import annotations

import torch

from plait.data.digits import load_digits_splits
from plait.models import MLPClassifier


def test_digits_split_is_fixed_and_disjoint():
    train, val = load_digits_splits(0.2)
    again, val2 = load_digits_splits(0.2)
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert torch.equal(val.x, val2.x) and torch.equal(train.y, again.y)
    rows = {tuple(r.tolist()) for r in train.x}
    assert sum(tuple(r.tolist()) in rows for r in val.x) < 10  # (a few digits are pixel-identical)
    x, y = train.batch([0, 5, 7])
    assert x.shape == (3, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.long and set(y.tolist()) <= set(range(10))


def test_mlp_learns_the_digits_in_one_process():
    train, val = load_digits_splits(0.2)
    torch.manual_seed(0)
    model = MLPClassifier(64, 32, 1, 10)
    assert model(val.x).shape == (len(val), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(train), (32,), generator=g)
        _, loss = model(*train.batch(idx.tolist()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    logits, _ = model(val.x, val.y)
    assert (logits.argmax(-1) == val.y).float().mean() > 0.9

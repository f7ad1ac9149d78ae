"""Shared set-up of the federated-learning tests (they need the plait[fl] extra)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("flwr", reason="the federated tests need the plait[fl] extra (Flower)")

FLOWER_RUNTIME_ENV = "PLAIT_FLOWER_RUNTIME_TESTS"


def pytest_configure(config):
    config.addinivalue_line("markers", "flower_runtime: starts Flower's own runtimes (Ray simulation, or a "
                                       f"SuperLink with SuperNodes); skipped with {FLOWER_RUNTIME_ENV}=0")


def pytest_collection_modifyitems(config, items):
    # They run in `make test` (about a minute together on 2 cores); =0 skips them for a quick pass.
    if os.environ.get(FLOWER_RUNTIME_ENV) != "0":
        return
    skip = pytest.mark.skip(reason=f"starts Flower's runtimes; {FLOWER_RUNTIME_ENV}=0 was set")
    for item in items:
        if "flower_runtime" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_quiet_flower():
    import torch

    from plait.fl.command import quiet_flower

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models, clients one after another
    quiet_flower(False)
    yield
    torch.set_num_threads(threads)


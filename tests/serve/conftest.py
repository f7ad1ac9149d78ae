"""Fixtures of the serving tests (see `tests.serve.support`)."""

from tests.serve.support import one_intra_op_thread  # noqa: F401 (an autouse fixture)

"""The exceptions plait raises on bad input.

Every message names the field, file or input at fault and says what would be valid, so a user can
fix it without reading plait's source.
"""


class PlaitError(Exception):
    """Base class of every error plait raises on purpose."""


class ConfigError(PlaitError, ValueError):
    """A configuration field is unknown, of the wrong type, out of range or inconsistent."""


class DataError(PlaitError, ValueError):
    """Input data is missing, empty or too small for the requested sequences."""


class CheckpointError(PlaitError):
    """A checkpoint is missing, truncated, corrupted or incompatible with the run."""


class MeshError(PlaitError, ValueError):
    """The parallel layout does not fit the world size or the process environment."""


class PlanError(PlaitError, ValueError):
    """A parallel plan does not fit the model it is applied to."""


class LaunchError(PlaitError, RuntimeError):
    """Worker processes failed; the message names the rank and its error."""

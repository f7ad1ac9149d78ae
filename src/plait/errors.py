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


class LayoutError(PlanError):
    """A named-dimension layout breaks a rule (Mesh-TensorFlow's, or what plait can compile)."""


class LaunchError(PlaitError, RuntimeError):
    """Worker processes failed; the message names the rank and its error."""


class PreemptedError(PlaitError, RuntimeError):
    """Training stopped on a preemption signal (SIGTERM, SIGUSR1) after its workers were asked to
    checkpoint: rerunning the command resumes it. Command-line entry points exit with code 75."""


class RequestError(PlaitError, ValueError):
    """A generation request is invalid; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ServerBusyError(PlaitError, RuntimeError):
    """The serving queue is full: the request was refused, and may be retried later."""


class EngineDeadError(PlaitError, RuntimeError):
    """A server's engine process died: the requests it held failed, and the server stops so that
    whatever supervises it (the router, a service manager) starts a new one."""


class HangError(PlaitError, RuntimeError):
    """A collective failed while peers had stopped answering; the message names those ranks."""


class ExportError(PlaitError, RuntimeError):
    """An export to another runtime cannot be done (a missing extra, an unknown format) or does
    not reproduce the model it was made from."""

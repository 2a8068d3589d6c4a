"""Exceptions that carry a message meant for the user.

The CLI prints a :class:`QuantpipeError` as one line and exits non-zero, without a traceback.
Any other exception is a bug and keeps its traceback.
"""

__all__ = ["QuantpipeError", "ConfigError", "FrameError", "ArtifactMismatchError", "MissingDependencyError"]


class QuantpipeError(Exception):
    """A user-facing error: bad input, bad configuration, a missing artifact. Say what to do."""


class ConfigError(QuantpipeError, ValueError):
    """A configuration value or command-line flag is invalid."""


class FrameError(QuantpipeError, ValueError):
    """A wire frame is malformed, truncated, oversized, inconsistent or corrupted.

    ``kind`` is a short stable label (``"magic"``, ``"crc"``, ``"length"``, ...) used as a metric label.
    """

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


class ArtifactMismatchError(QuantpipeError):
    """An artifact (stage graph, engine, clip table) does not match what it is used with."""


class MissingDependencyError(QuantpipeError, ImportError):
    """An optional dependency needed for this operation is not installed."""

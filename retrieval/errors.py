"""The one error type a user sees: a clear one-line message, exit code 2, no traceback."""


class RetrievalError(Exception):
    """Bad input or a mismatched artifact; `str(err)` is the whole message a user reads."""


class DataError(RetrievalError):
    """An input file is missing, unreadable, malformed or holds a bad value."""


class ArtifactError(RetrievalError):
    """A model bundle or index is missing, corrupt, or built from something else."""


class ConfigError(RetrievalError, ValueError):
    """A setting is out of range or inconsistent with another (checked before any work)."""


class TrainingError(RetrievalError):
    """Training could not produce a usable model (the loss diverged before any good epoch)."""

"""One error hierarchy for the whole pipeline.

Every error says where (job key, file, shard or row) and, where it can, how to fix it.
``exit_code`` maps errors onto the CLI contract in DESIGN.md; ``transient`` drives retries.
Errors are plain exceptions with picklable arguments so they cross Ray process boundaries.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a problem the pipeline understands and can explain in one line."""

    exit_code = 2
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep subclasses picklable whatever their __init__ looks like
        return (_rebuild, (type(self), self.message))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[PipelineError], message: str) -> PipelineError:
    err = cls.__new__(cls)
    PipelineError.__init__(err, message)
    return err


class ConfigError(PipelineError):
    """The job file or an override is invalid (exit 2)."""


class InputError(PipelineError):
    """Input data cannot be listed or read before the job starts (exit 2)."""


class ModelError(PipelineError):
    """The model bundle is missing, corrupt or incompatible with the runtime (exit 2)."""


class OutputError(PipelineError):
    """The output location conflicts with the job (exit 2): overwrite of input, fingerprint."""


class ShardError(PipelineError):
    """A shard failed while running. ``transient`` says whether another attempt may help."""

    exit_code = 1

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return (ShardError, (self.message, self.transient))


class TransientError(ShardError):
    """Storage throttling, timeouts, connection resets, lost actors: retry with backoff."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message, transient=True)

    def __reduce__(self):
        return (TransientError, (self.message,))

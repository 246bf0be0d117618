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


class DeviceError(TransientError):
    """The session or its device broke, not the data: a CUDA/cuDNN/cuBLAS/TensorRT error, an
    execution-provider failure, a session that fails input it ran before, or a provider that
    stopped running the session mid-job. Retry the shard on another worker (a fresh process);
    never dead-letter its rows. ``provider`` ran the session; ``provider_after`` runs it now,
    where that changed."""

    def __init__(self, message: str, provider: str | None = None,
                 provider_after: str | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.provider_after = provider_after

    def __reduce__(self):
        return (DeviceError, (self.message, self.provider, self.provider_after))


# Every DeviceError message starts with this, so a report can count them from error strings.
DEVICE_ERROR_PREFIX = "device error"


def is_device_error(message: str) -> bool:
    """True for the message of a DeviceError (as the runner records shard errors)."""
    return message.startswith(DEVICE_ERROR_PREFIX)


_TRANSIENT_HINTS = (
    "slowdown", "slow down", "throttl", "timeout", "timed out", "temporarily", "connection",
    "reset by peer", "broken pipe", "503", "500", "502", "504", "internalerror",
    "serviceunavailable", "too many requests", "429", "eof occurred", "disconnect",
    "could not connect", "reduce your request rate", "requesttimeout",
)


def classify_io_error(exc: BaseException, what: str) -> ShardError:
    """Turn an exception from storage I/O into a ShardError marked transient or terminal."""
    if isinstance(exc, ShardError):
        return exc
    text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    if isinstance(exc, FileNotFoundError):
        return ShardError(f"{what}: file not found ({text})")
    if isinstance(exc, PermissionError):
        return ShardError(f"{what}: permission denied ({text})")
    lowered = text.lower()
    if isinstance(exc, (TimeoutError, ConnectionError)) or any(h in lowered for h in _TRANSIENT_HINTS):
        return TransientError(f"{what}: {text}")
    # Anything else (corrupt data, bad schema) fails the same way every time: not retried.
    return ShardError(f"{what}: {text}")

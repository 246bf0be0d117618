"""One error hierarchy for the whole pipeline, and the helpers that word errors in one line.

Every error says where (job key, file, shard or row) and, where it can, how to fix it.
``exit_code`` maps errors onto the CLI contract (docs/architecture.md, "Exit codes");
``transient`` drives retries. Errors are plain exceptions with picklable arguments so they
cross Ray process boundaries; the cause of a translated error is chained (``raise ... from
exc``) so that ``--debug`` shows the original traceback, while the CLI prints one line.
"""

from __future__ import annotations

import errno
from typing import Any

from pipeline.redaction import scrub

ONE_LINE = 300  # characters of a cause quoted inside a message, at most


def one_line(value: BaseException | str, limit: int = ONE_LINE) -> str:
    """``value`` on one line, cut at ``limit`` characters; an exception without a message
    reads as its type name."""
    text = " ".join(str(value).split())
    if not text and isinstance(value, BaseException):
        text = type(value).__name__
    return text[:limit]


def cause_text(exc: BaseException, *storage_options: dict[str, Any] | None,
               limit: int = ONE_LINE) -> str:
    """``Type: message`` of ``exc`` on one line, secrets of ``storage_options`` scrubbed."""
    return f"{type(exc).__name__}: {one_line(scrub(str(exc), *storage_options), limit)}"


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
    """A shard failed while running. ``transient`` says whether another attempt may help;
    ``shard_id`` names the shard once the worker that ran it knows (None before)."""

    exit_code = 1

    def __init__(self, message: str, transient: bool = False, shard_id: str | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.shard_id = shard_id

    def __reduce__(self):
        return (ShardError, (self.message, self.transient, self.shard_id))


class TransientError(ShardError):
    """Storage throttling, timeouts, connection resets, lost actors: retry with backoff."""

    def __init__(self, message: str, transient: bool = True, shard_id: str | None = None) -> None:
        super().__init__(message, transient=True, shard_id=shard_id)

    def __reduce__(self):
        return (TransientError, (self.message, True, self.shard_id))


class DeviceError(TransientError):
    """The session or its device broke, not the data: a CUDA/cuDNN/cuBLAS/TensorRT error, an
    execution-provider failure, a session that fails input it ran before, or a provider that
    stopped running the session mid-job. Retry the shard on another worker (a fresh process);
    never dead-letter its rows. ``provider`` ran the session; ``provider_after`` runs it now,
    where that changed. The report counts these by type (``attempts.device_errors``)."""

    def __init__(self, message: str, provider: str | None = None,
                 provider_after: str | None = None, shard_id: str | None = None) -> None:
        super().__init__(message, shard_id=shard_id)
        self.provider = provider
        self.provider_after = provider_after

    def __reduce__(self):
        return (DeviceError, (self.message, self.provider, self.provider_after, self.shard_id))


class OutOfMemory(TransientError):
    """A shard ran its worker out of memory: a ``MemoryError``, or onnxruntime failing to
    allocate for a single row. Another worker may have the memory, so it is transient; the
    runner retries the shard in smaller pieces with smaller batches (``pipeline.isolation``)."""

    def __reduce__(self):
        return (OutOfMemory, (self.message, True, self.shard_id))


# Every DeviceError message starts with this, so that a reader of a log line knows it at once.
DEVICE_ERROR_PREFIX = "device error"


_TRANSIENT_HINTS = (
    "slowdown", "slow down", "throttl", "timeout", "timed out", "temporarily", "connection",
    "reset by peer", "broken pipe", "503", "500", "502", "504", "internalerror",
    "serviceunavailable", "service unavailable", "too many requests", "429", "eof occurred",
    "disconnect",
    "could not connect", "reduce your request rate", "requesttimeout",
    "checksum",  # a body that does not match its checksum was damaged on the way
)


def classify_io_error(exc: BaseException, what: str) -> ShardError:
    """Turn an exception from storage I/O into a ShardError marked transient or terminal."""
    if isinstance(exc, ShardError):
        return exc
    access = describe_access(exc)
    if access is not None:  # credentials, permissions, a missing bucket: never transient
        return ShardError(f"{what}: {access}")
    text = cause_text(exc)
    if isinstance(exc, FileNotFoundError):
        return ShardError(f"{what}: file not found ({text})")
    if isinstance(exc, PermissionError):
        return ShardError(f"{what}: permission denied ({text})")
    lowered = text.lower()
    # s3fs words SlowDown, ServiceUnavailable and 503 as OSError(EBUSY, "Service Unavailable").
    busy = isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.EAGAIN)
    if busy or isinstance(exc, (TimeoutError, ConnectionError)) or \
            any(h in lowered for h in _TRANSIENT_HINTS):
        return TransientError(f"{what}: {text}")
    # Anything else (corrupt data, bad schema) fails the same way every time: not retried.
    return ShardError(f"{what}: {text}")


# ----------------------------------------------------------------------------- access errors
# Missing credentials, refused credentials and missing buckets: a retry cannot help and the
# fix is the user's, so the driver stops with exit 2 naming the job key, and a worker fails the
# shard at once. Exceptions are matched by type name and error code, never imported: botocore,
# s3fs, gcsfs, adlfs and google-auth are optional.

_NO_CREDENTIALS = ("NoCredentialsError", "DefaultCredentialsError")
_BAD_CREDENTIALS = ("PartialCredentialsError", "CredentialRetrievalError", "RefreshError",
                    "TokenRetrievalError", "ClientAuthenticationError", "UnauthorizedSSOTokenError")
_CODES = {
    "AccessDenied": "access denied (403)", "403": "access denied (403)",
    "Forbidden": "access denied (403)", "AllAccessDisabled": "access denied (403)",
    "AccountProblem": "access denied (403, AccountProblem)",
    "AuthorizationFailure": "access denied (403)",
    "AuthorizationPermissionMismatch": "access denied (403)",
    "InvalidAccessKeyId": "access denied (403, InvalidAccessKeyId: the access key id is unknown)",
    "SignatureDoesNotMatch": "access denied (403, SignatureDoesNotMatch: the secret does not "
                             "match the access key)",
    "ExpiredToken": "credentials expired (ExpiredToken)",
    "TokenRefreshRequired": "credentials expired (TokenRefreshRequired)",
    "InvalidToken": "access denied (InvalidToken: the session token is invalid)",
    "401": "authentication failed (401)", "AuthenticationFailed": "authentication failed (401)",
    "InvalidAuthenticationInfo": "authentication failed (401)",
    "NoSuchBucket": "bucket does not exist", "ContainerNotFound": "container does not exist",
}
_NO_CREDENTIALS_HINT = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or {section}.storage_options",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or {section}.storage_options.token",
    "az": "set AZURE_STORAGE_CONNECTION_STRING or {section}.storage_options "
          "(account_name with account_key, sas_token or a credential)",
}
_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az",
            "abfss": "az", "adl": "az"}
_ERROR_CLASSES = {"input": InputError, "model": ModelError, "output": OutputError}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (s3fs raises PermissionError from botocore's ClientError)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__
    return seen


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    code = getattr(exc, "error_code", None)  # azure HttpResponseError
    if code:
        return str(code)
    status = getattr(exc, "status_code", None) or getattr(exc, "code", None)  # azure, gcsfs
    return str(status) if status in (401, 403) else None


def describe_access(exc: BaseException, section: str = "", uri: str = "") -> str | None:
    """What went wrong, in a few words, when ``exc`` is an access problem: no credentials,
    refused credentials, access denied, a missing bucket. None for anything else."""
    if isinstance(exc, PipelineError):
        return None
    chain = _chain(exc)
    for err in chain:
        code = _code(err)
        if code in _CODES:
            return _CODES[code]
    for err in chain:
        name = type(err).__name__
        if name in _NO_CREDENTIALS:
            if not section:
                return "no credentials found"
            hint = _NO_CREDENTIALS_HINT.get(_SCHEMES.get(uri.split("://", 1)[0], ""),
                                            "set {section}.storage_options")
            return f"no credentials found ({hint.format(section=section)})"
        if name in _BAD_CREDENTIALS:
            return f"credentials not usable ({name}: {one_line(err, 160)})"
    text = " ".join(str(exc).split()).lower()
    if "bucket does not exist" in text or "nosuchbucket" in text:
        return "bucket does not exist"
    if isinstance(exc, OSError) and text.startswith("forbidden:"):  # gcsfs's 403
        return "access denied (403)"
    if isinstance(exc, PermissionError):  # a local file, or a store's 403 without a code
        return f"permission denied ({one_line(exc, 160)})"
    return None


def access_error(exc: BaseException, key: str, uri: str) -> PipelineError | None:
    """A one-line exit-2 error for an access problem at job key ``key`` (``input.uri``,
    ``model.uri``, ``output.uri``) on ``uri``; None when ``exc`` is not an access problem."""
    section = key.split(".", 1)[0]
    cause = describe_access(exc, section, uri)
    if cause is None:
        return None
    return _ERROR_CLASSES.get(section, PipelineError)(f"{key}: {uri}: {cause}")


def storage_error(exc: BaseException, key: str, uri: str, doing: str,
                  storage_options: dict[str, Any] | None = None) -> PipelineError:
    """The one-line exit-2 error for a storage call at job key ``key`` that failed: an access
    problem names its cause (``access_error``); anything else says what failed, as
    ``<key>: cannot <doing> <uri> (<Type>: <message>)`` with secrets scrubbed. A
    PipelineError passes through. Raise it ``from exc``."""
    if isinstance(exc, PipelineError):
        return exc
    access = access_error(exc, key, uri)
    if access is not None:
        return access
    error = _ERROR_CLASSES.get(key.split(".", 1)[0], PipelineError)
    return error(f"{key}: cannot {doing} {uri} ({cause_text(exc, storage_options, limit=200)})")

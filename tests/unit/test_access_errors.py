"""One classification of access problems (pipeline.errors.access_error): the error class and
key per section, the cause in a few words, and never a transient error for a shard."""

from __future__ import annotations

import errno
import pickle

import botocore.exceptions as boto
import pytest

from pipeline.errors import (
    InputError,
    ModelError,
    OutputError,
    access_error,
    classify_io_error,
    describe_access,
)
from pipeline.storage import with_retries


def client_error(code: str, message: str = "", translated: type[OSError] | None = None):
    """A botocore ClientError, or the OSError s3fs raises from it (its cause)."""
    err = boto.ClientError({"Error": {"Code": code, "Message": message or code}}, "Op")
    if translated is None:
        return err
    exc = translated(message or code)
    exc.__cause__ = err
    return exc


class HttpResponseError(Exception):  # azure.core's, by name and attributes
    def __init__(self, message: str, status_code: int, error_code: str | None = None):
        super().__init__(message)
        self.status_code, self.error_code = status_code, error_code


class HttpError(Exception):  # gcsfs's
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


CASES = [
    (boto.NoCredentialsError(), "no credentials found (set AWS_ACCESS_KEY_ID/"
     "AWS_SECRET_ACCESS_KEY or input.storage_options)"),
    (boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
     "credentials not usable (PartialCredentialsError: Partial credentials found in env, "
     "missing: AWS_SECRET_ACCESS_KEY)"),
    (client_error("AccessDenied", "Access Denied", PermissionError), "access denied (403)"),
    (client_error("403", "Forbidden", PermissionError), "access denied (403)"),
    (client_error("InvalidAccessKeyId", "", PermissionError),
     "access denied (403, InvalidAccessKeyId: the access key id is unknown)"),
    (client_error("SignatureDoesNotMatch", "", PermissionError),
     "access denied (403, SignatureDoesNotMatch: the secret does not match the access key)"),
    (client_error("ExpiredToken", "", PermissionError), "credentials expired (ExpiredToken)"),
    (client_error("NoSuchBucket", "The specified bucket does not exist", FileNotFoundError),
     "bucket does not exist"),
    (client_error("AccessDenied"), "access denied (403)"),  # untranslated
    (FileNotFoundError("bucket does not exist: b"), "bucket does not exist"),
    (PermissionError(errno.EACCES, "Permission denied"),
     "permission denied ([Errno 13] Permission denied)"),
    (HttpResponseError("This request is not authorized", 403, "AuthorizationFailure"),
     "access denied (403)"),
    (HttpResponseError("The specified container does not exist.", 404, "ContainerNotFound"),
     "container does not exist"),
    (HttpError("Anonymous caller does not have storage.objects.list access", 401),
     "authentication failed (401)"),
    (OSError("Forbidden: b/in\nno storage.objects.get access"), "access denied (403)"),  # gcsfs
]


@pytest.mark.parametrize(("exc", "cause"), CASES, ids=[c[1][:40] for c in CASES])
def test_access_problems_become_one_line_exit_2_errors(exc, cause):
    err = access_error(exc, "input.uri", "s3://b/in")
    assert isinstance(err, InputError) and err.exit_code == 2
    assert str(err) == f"input.uri: s3://b/in: {cause}"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # crosses Ray process boundaries


@pytest.mark.parametrize("exc", [FileNotFoundError("in/a.parquet"), OSError("corrupt"),
                                 ConnectionResetError("reset"), ValueError("bad"),
                                 client_error("NoSuchKey", "", FileNotFoundError),
                                 client_error("SlowDown", "Please reduce your request rate")])
def test_other_errors_are_not_access_problems(exc):
    assert access_error(exc, "input.uri", "s3://b/in") is None


def test_section_picks_the_error_class_and_the_hint():
    exc = boto.NoCredentialsError()
    assert isinstance(access_error(exc, "model.uri", "s3://b/m"), ModelError)
    out = access_error(exc, "output.uri", "gs://b/out")
    assert isinstance(out, OutputError)
    assert str(out) == ("output.uri: gs://b/out: no credentials found (set "
                        "GOOGLE_APPLICATION_CREDENTIALS or output.storage_options.token)")


@pytest.mark.parametrize(("exc", "_"), CASES, ids=[c[1][:40] for c in CASES])
def test_access_problems_are_terminal_for_shards(exc, _):
    err = classify_io_error(exc, "reading s3://b/in/a.parquet")
    assert err.transient is False
    assert err.message.startswith("reading s3://b/in/a.parquet: ")
    assert describe_access(exc) in err.message


def test_driver_calls_do_not_retry_access_problems():
    calls = []

    def denied():
        calls.append(1)
        raise client_error("AccessDenied", "Access Denied", PermissionError)

    with pytest.raises(PermissionError):
        with_retries(denied, "listing", base_delay_s=0)
    assert len(calls) == 1

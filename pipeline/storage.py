"""Filesystem access through fsspec: one place that turns URIs into filesystems.

Atomicity: local writes go to a temp file in the same directory and are renamed into
place; object-store PUTs are atomic per object already, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

CHUNK = 4 * 1024 * 1024
T = TypeVar("T")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fs, path)`` for a URI; local paths and ``file://`` both work."""
    return url_to_fs(uri, **(storage_options or {}))


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def protocol_of(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def full_uri(fs, path: str) -> str:
    """An absolute URI with a scheme that ``filesystem`` turns back into the same path."""
    proto = protocol_of(fs)
    if proto in ("file", "local"):
        return "file://" + os.path.abspath(path)
    return f"{proto}://{path}"


@contextmanager
def atomic_writer(fs, path: str) -> Iterator[IO[bytes]]:
    """Write to ``path`` so that readers see either nothing or the whole file."""
    if protocol_of(fs) in ("file", "local"):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # A single PUT (or a multipart upload completed on close) is atomic on S3/GCS.
        # On an exception the upload is discarded, never completed: closing would publish
        # the bytes written so far over a good object.
        fh = fs.open(path, "wb")
        try:
            yield fh
        except BaseException:
            discard = getattr(fh, "discard", None)
            if discard is not None:
                discard()
                fh.closed = True  # discarded: garbage collection must not try to flush it
            raise
        fh.close()


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    with atomic_writer(fs, path) as fh:
        fh.write(data)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def open_uri(uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None):
    return fsspec.open(uri, mode, **(storage_options or {}))


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay_s: float = 0.5) -> T:
    """Run a driver-side storage call, retrying transient errors (throttling, resets) with
    exponential backoff and jitter. Workers do not need this: a failed shard is retried whole.
    """
    from pipeline.errors import PipelineError, classify_io_error

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PipelineError:
            raise
        except Exception as exc:
            if attempt == attempts or not classify_io_error(exc, what).transient:
                raise
            time.sleep(base_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")

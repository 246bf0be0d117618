"""Filesystem access through fsspec: one place that turns URIs into filesystems.

Atomicity: local writes go to a temp file in the same directory and are renamed into
place; object-store PUTs are atomic per object already, so a reader never sees half a file.

Where this is not atomic:
- ``StagedFile`` on object stores other than S3 completes its upload in ``publish`` by
  closing the file, so the last buffered block is uploaded inside the publish step (S3:
  only the CompleteMultipartUpload request is).
- ``create_exclusive`` is atomic on local disks (a hard link fails when the name exists) and
  on S3 (PutObject with ``If-None-Match: *``; AWS, MinIO and moto honour it, an S3-compatible
  store that ignores the header overwrites). Elsewhere fsspec checks, then writes: another
  writer can slip in between (``commit_lock`` closes that gap on local disks only).
"""

from __future__ import annotations

import contextlib
import fcntl
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

from pipeline.errors import PipelineError, classify_io_error

CHUNK = 4 * 1024 * 1024
T = TypeVar("T")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fs, path)`` for a URI; local paths and ``file://`` both work."""
    return url_to_fs(uri, **(storage_options or {}))


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


BUCKET_STORES = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl")


def check_bucket(fs, path: str) -> None:
    """Raise when the bucket (container) of ``path`` is missing or refused. ``exists`` and
    ``glob`` report a missing bucket as a missing path; call this when nothing was found to
    say why (one HEAD request)."""
    if protocol_of(fs) not in BUCKET_STORES:
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"bucket does not exist: {bucket}") from exc


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


def _local(fs) -> bool:
    return protocol_of(fs) in ("file", "local")


class StagedFile:
    """A file written under a name of its own and published at ``path`` only on ``publish``
    (or thrown away by ``discard``), so that the writer can decide late whether it may.

    Local disks: a temp file beside ``path``, fsynced, renamed into place. S3: a multipart
    upload that ``finish`` fills and ``publish`` completes (fsspec ``autocommit=False``). Other
    object stores: an upload completed when ``publish`` closes the file.
    """

    def __init__(self, fs, path: str) -> None:
        self.fs, self.path = fs, path
        self.tmp: str | None = None
        self.deferred = False
        if _local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(path),
                                    f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
            self.fh: IO[bytes] = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/discard)
        elif protocol_of(fs) in ("s3", "s3a"):
            self.fh = fs.open(path, "wb", autocommit=False)
            self.deferred = True
        else:
            self.fh = fs.open(path, "wb")
        self.state = "open"

    def finish(self) -> None:
        """Every byte written and durable, nothing visible at ``path`` yet (S3, local)."""
        if self.state != "open":
            return
        if self.tmp is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        elif self.deferred:
            self.fh.close()  # uploads the last part; the upload stays incomplete
        self.state = "finished"

    def publish(self) -> None:
        self.finish()
        if self.tmp is not None:
            os.replace(self.tmp, self.path)
        elif self.deferred:
            self.fh.commit()
            self._forget()
        else:
            self.fh.close()
        self.state = "published"

    def discard(self) -> None:
        if self.state in ("published", "discarded"):
            return
        if self.tmp is not None:
            self.fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
        else:
            discard = getattr(self.fh, "discard", None)
            if discard is not None:
                discard()  # aborts the multipart upload: the bytes are never published
                self.fh.closed = True  # garbage collection must not try to flush it
            self._forget()
        self.state = "discarded"

    def _forget(self) -> None:
        # fsspec lists files opened with autocommit=False in the filesystem's transaction.
        transaction = getattr(self.fs, "_transaction", None)
        if transaction is not None:
            with contextlib.suppress(ValueError):
                transaction.files.remove(self.fh)


@contextmanager
def commit_lock(fs, folder: str) -> Iterator[None]:
    """Serialise commits into ``folder`` across processes on local (and locking shared)
    filesystems; object stores have no lock: there each step is a single conditional request.
    The kernel releases the lock of a process that dies holding it."""
    if not _local(fs):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".commit.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def abort_uploads(fs, root: str) -> int:
    """Abort unfinished multipart uploads below ``root`` (S3): an attempt killed between
    writing its part file and committing leaves one, which S3 would keep (and bill) forever."""
    if protocol_of(fs) not in ("s3", "s3a"):
        return 0
    bucket, key, _ = fs.split_path(root)
    prefix = key.rstrip("/") + "/" if key else ""
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for upload in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                   UploadId=upload["UploadId"])
    return len(uploads)


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; False when it did (nothing written).

    Local: temp file + fsync + hard link, which fails atomically on an existing name; where
    hard links are not supported, exists-then-rename (callers hold ``commit_lock``). S3:
    PutObject with ``If-None-Match: *``. Other stores: fsspec's ``mode="create"``.
    """
    if not _local(fs):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and SMB mounts)
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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

"""Conditional operations on the lease file, one store per kind of storage (see
``pipeline.lease`` for what each guarantees): S3 (``If-None-Match`` / ``If-Match``), local and
shared filesystems (exclusive create, then ``flock`` on the file), and other fsspec stores
(compare, then write: not atomic)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any

from pipeline import storage
from pipeline.layout import LEASE_FILE, OutputLayout


class LeaseStore:
    """Conditional operations on one small file; ``version`` is what a change is conditional
    on (an ETag, or the bytes read under the lock)."""

    def read(self) -> tuple[bytes, Any] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> bool:
        raise NotImplementedError

    def replace(self, data: bytes, version: Any) -> bool:
        raise NotImplementedError

    def delete(self, version: Any) -> bool:
        raise NotImplementedError


class S3LeaseStore(LeaseStore):
    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes, Any] | None:
        try:
            info = self.fs.info(self.path, refresh=True)
            # Read after the ETag: the bytes are at least as new, and a change conditional on
            # an older ETag fails, which is safe.
            return self.fs.cat_file(self.path), info["ETag"]
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> bool:
        return storage.create_exclusive(self.fs, self.path, data)

    def replace(self, data: bytes, version: Any) -> bool:
        return self._conditional("put_object", version, Body=data)

    def delete(self, version: Any) -> bool:
        return self._conditional("delete_object", version)

    def _conditional(self, call: str, etag: Any, **kwargs: Any) -> bool:
        try:
            self.fs.call_s3(call, Bucket=self.bucket, Key=self.key, IfMatch=etag, **kwargs)
        except (FileNotFoundError, FileExistsError):
            return False
        except Exception as exc:
            text = f"{type(exc).__name__} {exc}".lower().replace("-", "")
            if "precondition" in text or "412" in text:  # s3fs words a 412 as EINVAL
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True


class LocalLeaseStore(LeaseStore):
    """In place under ``flock`` on the lease file itself; the version is the bytes read."""

    def __init__(self, path: str) -> None:
        self.path = path
        # The folders the lease made (a first run's output): removed with it when left empty,
        # so a run that stops before writing anything leaves nothing behind.
        self.made: list[str] = []
        folder = os.path.dirname(path)
        while not os.path.exists(folder):
            self.made.append(folder)
            folder = os.path.dirname(folder)
        if self.made:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def read(self) -> tuple[bytes, Any] | None:
        with self._locked() as fh:
            if fh is None:
                return None
            data = fh.read()
            return data, data

    def create(self, data: bytes) -> bool:
        return storage.create_exclusive(storage.filesystem(self.path)[0], self.path, data)

    def replace(self, data: bytes, version: Any) -> bool:
        with self._locked() as fh:
            if fh is None or fh.read() != version:
                return False
            fh.seek(0)
            fh.truncate()
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            return True

    def delete(self, version: Any) -> bool:
        with self._locked() as fh:
            if fh is None or fh.read() != version:
                return False
            os.unlink(self.path)
        for folder in self.made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        return True

    @contextlib.contextmanager
    def _locked(self):
        """The file open and locked, or None when there is none; a file that was removed or
        replaced while we waited for its lock is opened again."""
        while True:
            try:
                fh = open(self.path, "rb+")  # noqa: SIM115 (closed below, after the unlock)
            except FileNotFoundError:
                yield None
                return
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and current.st_ino == os.fstat(fh.fileno()).st_ino:
                    yield fh
                    return
            finally:
                fh.close()  # closing releases the lock


class CheckThenWriteStore(LeaseStore):
    """Stores with no conditional write in fsspec: compare, then write (not atomic)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> bool:
        return storage.create_exclusive(self.fs, self.path, data)

    def replace(self, data: bytes, version: Any) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        storage.write_bytes_atomic(self.fs, self.path, data)
        return True

    def delete(self, version: Any) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm(self.path)
        return True


def store_for(layout: OutputLayout) -> LeaseStore:
    path = layout.pipeline_path(LEASE_FILE)
    protocol = storage.protocol_of(layout.fs)
    if protocol == "file":
        return LocalLeaseStore(path)
    if protocol in ("s3", "s3a"):
        return S3LeaseStore(layout.fs, path)
    return CheckThenWriteStore(layout.fs, path)

"""The output layout on storage, and every write into it.

    <output>/part-<shard>.parquet            written first (atomically)
    <output>/_pipeline/dead_letter/<shard>.parquet
    <output>/_pipeline/shards/<shard>.json   written last for a shard: the commit point
    <output>/_pipeline/job.json, report.json
    <output>/_SUCCESS                        written last for the job

Storage state is the truth: resume lists the markers. Local writes are temp-file + rename;
object stores write each object in one PUT, so no reader ever sees half a file.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError

META_FINGERPRINT = b"pipeline.fingerprint"
META_MODEL = b"pipeline.model_sha256"
META_BUNDLE = b"pipeline.bundle_identity"
META_SHARD = b"pipeline.shard_id"


class ShardWriter:
    """Streams one shard's part file and dead letters into place, a window at a time.

    Each file is written through ``storage.atomic_writer`` (temp file + rename, or a
    multipart upload completed on close), so readers see the whole file or none; on an
    error both are discarded. Memory is one window plus the writer's buffers.
    """

    def __init__(self, layout: OutputLayout, shard_id: str, compression: str,
                 metadata: dict[bytes, bytes]) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self.compression = None if compression == "none" else compression
        self.metadata = metadata
        self.rows_out = 0
        self.rows_bad = 0
        self._stack = contextlib.ExitStack()
        self._part: pq.ParquetWriter | None = None
        self._dead: pq.ParquetWriter | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def _open(self, path: str, schema: pa.Schema, compression: str | None) -> pq.ParquetWriter:
        fh = self._stack.enter_context(storage.atomic_writer(self.layout.fs, path))
        return pq.ParquetWriter(fh, schema, compression=compression)

    def write(self, table: pa.Table) -> None:
        if self._part is None:
            schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self.metadata})
            self._part = self._open(self.layout.part_path(self.shard_id), schema, self.compression)
        self._part.write_table(_conform(table, self._part.schema))
        self.rows_out += table.num_rows

    def write_dead(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        if self._dead is None:
            self._dead = self._open(self.layout.dead_letter_path(self.shard_id), table.schema, "zstd")
        self._dead.write_table(_conform(table, self._dead.schema))
        self.rows_bad += table.num_rows

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # discard both files: nothing half-written is published
            self._stack.__exit__(exc_type, exc, tb)
            return
        if self._part is None:  # no row at all: an empty part file still marks the shard
            self.write(pa.table({}))
        with self._stack:
            for writer in (self._part, self._dead):
                if writer is not None:
                    writer.close()
        if self._dead is None:
            path = self.layout.dead_letter_path(self.shard_id)
            # A stale file from an earlier attempt must not outlive a clean retry.
            if self.layout.fs.exists(path):
                self.layout.fs.rm(path)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Windows of one shard share the first window's types (files may differ slightly)."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.select(schema.names).cast(schema.remove_metadata()).replace_schema_metadata(
            schema.metadata)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
        from pipeline.errors import ShardError

        raise ShardError(f"input files of one shard have incompatible columns: {exc}") from None


class OutputLayout:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, root = storage.filesystem(uri, storage_options)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def part_path(self, shard_id: str) -> str:
        return self._path(f"part-{shard_id}.parquet")

    def marker_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "shards", f"{shard_id}.json")

    def dead_letter_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "dead_letter", f"{shard_id}.parquet")

    # ------------------------------------------------------------------ shard commits

    def shard_writer(self, shard_id: str, compression: str,
                     metadata: dict[bytes, bytes]) -> ShardWriter:
        return ShardWriter(self, shard_id, compression, metadata)

    def write_marker(self, shard_id: str, marker: dict[str, Any]) -> None:
        data = json.dumps(marker, indent=1, default=str).encode()
        storage.write_bytes_atomic(self.fs, self.marker_path(shard_id), data)

    def committed_shards(self) -> set[str]:
        folder = self._path("_pipeline", "shards")
        self.fs.invalidate_cache(folder)  # other processes wrote there: never trust a listing cache
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        # Temp files of a marker being written (".tmp-...") are not commits.
        return {base[:-5] for n in names
                if (base := n.rsplit("/", 1)[-1]).endswith(".json") and not base.startswith(".")}

    def read_marker(self, shard_id: str) -> dict[str, Any]:
        with self.fs.open(self.marker_path(shard_id), "rb") as fh:
            return json.loads(fh.read())

    # ------------------------------------------------------------------ job files

    def read_job(self) -> dict[str, Any] | None:
        return self.read_json("job.json")

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._path("_pipeline", name), "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2, default=str).encode()
        storage.write_bytes_atomic(self.fs, self._path("_pipeline", name), payload)

    def write_success(self) -> None:
        storage.write_bytes_atomic(self.fs, self._path("_SUCCESS"), b"")

    def clear_success(self) -> None:
        if self.fs.exists(self._path("_SUCCESS")):
            self.fs.rm(self._path("_SUCCESS"))

    def has_output(self) -> bool:
        self.fs.invalidate_cache(self.root)
        try:
            return any(n.rsplit("/", 1)[-1].startswith(("part-", "_pipeline", "_SUCCESS"))
                       for n in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return False

    def remove_orphans(self, keep: set[str]) -> int:
        """Delete part and dead-letter files of shards outside the plan (left by a failed
        attempt before the input or sharding changed), so the folder holds one job's rows."""
        removed = 0
        for folder, prefix, suffix in ((self.root, "part-", ".parquet"),
                                       (self._path("_pipeline", "dead_letter"), "", ".parquet")):
            self.fs.invalidate_cache(folder)
            try:
                names = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            doomed = [name for name in names
                      if (base := name.rstrip("/").rsplit("/", 1)[-1]).startswith(prefix)
                      and base.endswith(suffix) and base[len(prefix):-len(suffix)] not in keep]
            if doomed:  # one call: object stores delete in batches (S3: 1,000 per request)
                self.fs.rm(doomed)
            removed += len(doomed)
        return removed

    def wipe(self) -> None:
        """Remove what a job writes (and nothing else that may live in the folder)."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        doomed = [name for name in names
                  if (base := name.rstrip("/").rsplit("/", 1)[-1]).startswith("part-")
                  or base == "_SUCCESS"]
        if doomed:  # one call: object stores delete in batches (S3: 1,000 per request)
            self.fs.rm(doomed)
        if any(name.rstrip("/").rsplit("/", 1)[-1] == "_pipeline" for name in names):
            self.fs.rm(self._path("_pipeline"), recursive=True)  # batched the same way
        self.fs.invalidate_cache(self.root)


def prepare_output(layout: OutputLayout, mode: str, fresh: bool, fingerprint: str) -> set[str]:
    """Apply the output mode; returns the ids of shards already committed (resume)."""
    if fresh or mode == "overwrite":
        layout.wipe()
        return set()
    previous = layout.read_job()
    if mode == "fail_if_exists" and (previous or layout.has_output()):
        raise OutputError(f"output.uri: {layout.uri} already holds output "
                          "(output.mode is fail_if_exists; use --fresh to replace it)")
    if previous is None:
        if layout.has_output():
            raise OutputError(f"output.uri: {layout.uri} holds part files but no "
                              "_pipeline/job.json; refusing to mix outputs (use --fresh)")
        return set()
    if previous.get("fingerprint") != fingerprint:
        raise OutputError(
            f"output.uri: {layout.uri} was written by a job with fingerprint "
            f"{str(previous.get('fingerprint'))[:12]}, this job is {fingerprint[:12]} "
            "(model or task changed); resume refused: use --fresh to start over"
        )
    layout.clear_success()
    return layout.committed_shards()

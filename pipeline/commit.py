"""The output layout on storage, and every write into it.

    <output>/part-<shard>.parquet            written first (atomically)
    <output>/_pipeline/dead_letter/<shard>.parquet
    <output>/_pipeline/shards/<shard>.json   written last for a shard: the commit point
    <output>/_pipeline/job.json, report.json
    <output>/_SUCCESS                        written last for the job

Storage state is the truth: resume lists the markers. Local writes are temp-file + rename;
object stores write each object in one PUT, so no reader ever sees half a file. A marker is
created only if none exists, and an attempt publishes its files only while the shard has no
marker (``ShardWriter``), so a late attempt never replaces what a shard committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError, ShardError, TransientError, describe_access

BROKEN = "_broken"  # committed_marker: a marker file whose content is not a marker


class ShardWriter:
    """Streams one shard's part file and dead letters, a window at a time, under names of this
    attempt (``storage.StagedFile``), then commits them unless the shard is already committed.

    ``commit(marker)``: finish both files (every byte written, nothing visible); then, under
    the output's commit lock (local disks; object stores have none):
      1. if the shard has a marker, discard this attempt's files and return that marker;
      2. publish the part file, then the dead letters (or remove a stale dead-letter file);
      3. create the marker exclusively; if another attempt created it first, return its marker.
    So a late attempt (a worker the driver gave up on) never replaces a committed shard's files:
    on local disks the lock makes 1-3 one step; on object stores a late attempt that reaches 1
    after the commit discards its files, and the marker itself is never replaced (conditional
    PUT). What remains there: an attempt that passes 1 just before another attempt creates the
    marker can still publish its part and dead letters over the committed ones (the duration of
    one or two requests); it then loses 3 and reports ``published`` (see the worker's note).

    On an error, or a clean exit without ``commit``, nothing half-written is published (a clean
    exit publishes the files without a marker, after the same check). Memory is one window plus
    the writer's buffers.
    """

    def __init__(self, layout: OutputLayout, shard_id: str, compression: str,
                 metadata: dict[bytes, bytes]) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self.compression = None if compression == "none" else compression
        self.metadata = metadata
        self.rows_out = 0
        self.rows_bad = 0
        self.published = False  # this attempt's files replaced what was at the final names
        self._files: dict[str, storage.StagedFile] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def _stage(self, kind: str, path: str) -> storage.StagedFile:
        """Where a file of this attempt is written before it is published (sinks override)."""
        return storage.StagedFile(self.layout.fs, path)

    def _open(self, kind: str, path: str, schema: pa.Schema,
              compression: str | None) -> pq.ParquetWriter:
        staged = self._files[kind] = self._stage(kind, path)
        writer = self._writers[kind] = pq.ParquetWriter(staged.fh, schema, compression=compression)
        return writer

    def write(self, table: pa.Table) -> None:
        part = self._writers.get("part")
        if part is None:
            schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self.metadata})
            part = self._open("part", self.layout.part_path(self.shard_id), schema, self.compression)
        part.write_table(_conform(table, part.schema))
        self.rows_out += table.num_rows

    def write_dead(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        dead = self._writers.get("dead")
        if dead is None:
            dead = self._open("dead", self.layout.dead_letter_path(self.shard_id), table.schema,
                              "zstd")
        dead.write_table(_conform(table, dead.schema))
        self.rows_bad += table.num_rows

    def _finish(self) -> None:
        if "part" not in self._writers:  # no row at all: an empty part file still marks the shard
            self.write(pa.table({}))
        for kind, writer in self._writers.items():
            writer.close()
            self._files[kind].finish()

    def _publish(self) -> dict[str, Any] | None:
        """Steps 1-2 (caller holds the commit lock): the committed marker, or None once this
        attempt's files are in place."""
        committed = self.layout.committed_marker(self.shard_id)
        if committed is not None and not committed.get(BROKEN):
            self._discard()
            return committed
        self._publish_part()
        self.published = True
        if "dead" in self._files:
            self._files["dead"].publish()
        else:  # a stale file from an earlier attempt must not outlive a clean retry
            path = self.layout.dead_letter_path(self.shard_id)
            self.layout.fs.invalidate_cache(path.rsplit("/", 1)[0])
            if self.layout.fs.exists(path):
                self.layout.fs.rm(path)
        return None

    def _publish_part(self) -> None:
        """Make the staged part file the shard's rows (table sinks: write its table files)."""
        self._files["part"].publish()

    def marker_extra(self) -> dict[str, Any]:
        """What a sink records in the marker about the published rows (table files)."""
        return {}

    def commit(self, marker: dict[str, Any],
               before_marker: Callable[[], None] | None = None) -> tuple[dict[str, Any], bool]:
        """Publish this attempt's files and create the marker; returns the shard's marker on
        storage and whether it is this attempt's (False: committed by another attempt)."""
        self._finish()
        self._done = True
        with storage.commit_lock(self.layout.fs, self.layout.shards_folder()):
            committed = self._publish()
            if committed is not None:
                return committed, False
            marker.update(self.marker_extra())
            if before_marker is not None:
                before_marker()
            if self.layout.create_marker(self.shard_id, marker):
                return marker, True
            committed = self.layout.committed_marker(self.shard_id)
            if committed is not None and committed.get(BROKEN):
                # A marker that is there but unreadable (seen with retried conditional PUTs on
                # moto: an empty body): this attempt's files are published, so its marker
                # replaces the broken one.
                self.layout.replace_marker(self.shard_id, marker)
                return marker, True
        if committed is None:  # refused, yet gone: someone is wiping the output
            raise TransientError(f"shard {self.shard_id}: its marker was refused as existing "
                                 "but cannot be read")
        # An earlier request of ours may have landed before a retried PUT was refused.
        return committed, committed.get("attempt_token") == marker.get("attempt_token")

    def _discard(self) -> None:
        for staged in self._files.values():
            staged.discard()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # discard both files: nothing half-written is published
            self._discard()
            return
        if self._done:
            return
        try:  # no commit: publish the files without a marker (uncommitted, as a crash leaves)
            self._finish()
            with storage.commit_lock(self.layout.fs, self.layout.shards_folder()):
                self._publish()
        except BaseException:
            self._discard()
            raise


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Windows of one shard share the first window's types (files may differ slightly)."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    try:
        return table.select(schema.names).cast(schema.remove_metadata()).replace_schema_metadata(
            schema.metadata)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
        raise ShardError(f"input files of one shard have incompatible columns: {exc}") from None


class OutputLayout:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, root = storage.filesystem(uri, storage_options)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def pipeline_path(self, *parts: str) -> str:
        return self._path("_pipeline", *parts)

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

    def shards_folder(self) -> str:
        return self._path("_pipeline", "shards")

    def create_marker(self, shard_id: str, marker: dict[str, Any]) -> bool:
        """Commit a shard: create its marker unless one exists (False: another attempt did)."""
        data = json.dumps(marker, indent=1, default=str).encode()
        return storage.create_exclusive(self.fs, self.marker_path(shard_id), data)

    def committed_marker(self, shard_id: str) -> dict[str, Any] | None:
        """The shard's marker as storage holds it now (no listing cache), None when there is
        none, ``{BROKEN: reason}`` when it exists but cannot be read as a marker."""
        path = self.marker_path(shard_id)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            data = self.fs.cat_file(path)  # one GET on object stores
        except FileNotFoundError:
            return None
        except Exception as exc:
            if "checksum" not in str(exc).lower():
                raise
            return {BROKEN: f"checksum mismatch: {exc}"}
        try:
            marker = json.loads(data)
        except ValueError as exc:
            return {BROKEN: f"not JSON ({len(data)} bytes): {exc}"}
        return marker if isinstance(marker, dict) else {BROKEN: "not a JSON object"}

    def replace_marker(self, shard_id: str, marker: dict[str, Any]) -> None:
        data = json.dumps(marker, indent=1, default=str).encode()
        storage.write_bytes_atomic(self.fs, self.marker_path(shard_id), data)

    def committed_shards(self) -> set[str]:
        folder = self.shards_folder()
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
        except FileNotFoundError as exc:
            if describe_access(exc) is not None:  # the bucket itself is missing
                raise
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

    def remove_orphans(self, keep: set[str], parts: bool = True) -> int:
        """Delete part and dead-letter files of shards outside the plan (left by a failed
        attempt before the input or sharding changed), so the folder holds one job's rows;
        and what killed attempts left: temp files, unfinished multipart uploads. Called when
        the job's workers are gone."""
        removed = storage.abort_uploads(self.fs, self.root)
        # Table outputs (parts=False): a part file outside the plan may be one an earlier
        # table version reads; only temp files go (vacuum removes the rest).
        for folder, prefix, suffix in ((self.root, "part-" if parts else "\0", ".parquet"),
                                       (self._path("_pipeline", "dead_letter"), "", ".parquet"),
                                       (self.shards_folder(), "\0", "")):
            self.fs.invalidate_cache(folder)
            try:
                names = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            doomed = [name for name in names
                      if (base := name.rstrip("/").rsplit("/", 1)[-1]).startswith(".tmp-")
                      or (base.startswith(prefix) and base.endswith(suffix)
                          and base[len(prefix):len(base) - len(suffix)] not in keep)]
            if doomed:  # one call: object stores delete in batches (S3: 1,000 per request)
                self.fs.rm(doomed)
            removed += len(doomed)
        return removed

    def wipe(self, table_dirs: tuple[str, ...] = ()) -> None:
        """Remove what a job writes (and nothing else that may live in the folder); a table
        output's folders too (``table_dirs``: ``_delta_log``, Lance's), history included."""
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
        present = {name.rstrip("/").rsplit("/", 1)[-1] for name in names}
        for folder in ("_pipeline", *table_dirs):
            if folder in present:
                self.fs.rm(self._path(folder), recursive=True)  # batched the same way
        self.fs.invalidate_cache(self.root)


def prepare_output(layout: OutputLayout, mode: str, fresh: bool, fingerprint: str,
                   fmt: str = "parquet",
                   table_dirs: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """Apply the output mode; returns the ids of shards already committed (resume).
    ``table_dirs``: each format's table folders, wiped with the output by --fresh."""
    previous = layout.read_job()
    earlier = ((previous or {}).get("spec", {}).get("output") or {}).get("format", "parquet")
    if fresh or mode == "overwrite":
        dirs = table_dirs or {}  # the format written before goes too (delta -> lance, say)
        layout.wipe(tuple(dict.fromkeys([*dirs.get(fmt, ()), *dirs.get(earlier, ())])))
        return set()
    if previous is not None and earlier != fmt:
        raise OutputError(f"output.format: {layout.uri} holds {earlier} output, this job "
                          f"writes {fmt}; use another output.uri, or --fresh to replace it")
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

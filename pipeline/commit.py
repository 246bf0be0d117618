"""The shard commit: a shard's part file and dead letters, then its marker, exactly once.

A marker is created only if none exists, and an attempt publishes its files only while the
shard has no marker, so a late attempt never replaces what a shard committed. Where each file
lives is ``pipeline.layout``; how a sink stores the part file is its ``PartFiles``
(``pipeline.sinks.base``). The remaining race on object stores is described in
``ShardWriter`` and in docs/architecture.md ("The commit protocol").
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ShardError, TransientError
from pipeline.layout import BrokenMarker, OutputLayout
from pipeline.sinks.base import FileParts, PartFiles
from pipeline.state import ShardMarker


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
                 metadata: dict[bytes, bytes], parts: PartFiles | None = None) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self.compression = None if compression == "none" else compression
        self.metadata = metadata
        self.parts = parts or FileParts(layout.fs)
        self.rows_out = 0
        self.rows_bad = 0
        self.published = False  # this attempt's files replaced what was at the final names
        self._files: dict[str, storage.StagedFile] = {}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._done = False

    def __enter__(self) -> ShardWriter:
        return self

    def _open(self, kind: str, staged: storage.StagedFile, schema: pa.Schema,
              compression: str | None) -> pq.ParquetWriter:
        self._files[kind] = staged
        writer = self._writers[kind] = pq.ParquetWriter(staged.fh, schema, compression=compression)
        return writer

    def write(self, table: pa.Table) -> None:
        part = self._writers.get("part")
        if part is None:
            schema = table.schema.with_metadata({**(table.schema.metadata or {}), **self.metadata})
            staged = self.parts.stage(self.layout.part_path(self.shard_id))
            part = self._open("part", staged, schema, self.compression)
        part.write_table(_conform(table, part.schema))
        self.rows_out += table.num_rows

    def write_dead(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        dead = self._writers.get("dead")
        if dead is None:
            staged = storage.StagedFile(self.layout.fs, self.layout.dead_letter_path(self.shard_id))
            dead = self._open("dead", staged, table.schema, "zstd")
        dead.write_table(_conform(table, dead.schema))
        self.rows_bad += table.num_rows

    def _finish(self) -> None:
        if "part" not in self._writers:  # no row at all: an empty part file still marks the shard
            self.write(pa.table({}))
        for kind, writer in self._writers.items():
            writer.close()
            self._files[kind].finish()
        self.parts.finished(self._files["part"], self.rows_out)

    def _publish(self) -> ShardMarker | None:
        """Steps 1-2 (caller holds the commit lock): the committed marker, or None once this
        attempt's files are in place."""
        committed = self.layout.committed_marker(self.shard_id)
        if isinstance(committed, ShardMarker):
            self._discard()
            return committed
        self.parts.publish(self._files["part"])
        self.published = True
        if "dead" in self._files:
            self._files["dead"].publish()
        else:  # a stale file from an earlier attempt must not outlive a clean retry
            path = self.layout.dead_letter_path(self.shard_id)
            self.layout.fs.invalidate_cache(path.rsplit("/", 1)[0])
            if self.layout.fs.exists(path):
                self.layout.fs.rm(path)
        return None

    def commit(self, marker: ShardMarker,
               before_marker: Callable[[], None] | None = None) -> tuple[ShardMarker, bool]:
        """Publish this attempt's files and create the marker; returns the shard's marker on
        storage and whether it is this attempt's (False: committed by another attempt)."""
        self._finish()
        self._done = True
        with storage.commit_lock(self.layout.fs, self.layout.shards_folder()):
            committed = self._publish()
            if committed is not None:
                return committed, False
            marker = marker.model_copy(update=self.parts.marker_fields())
            if before_marker is not None:
                before_marker()
            if self.layout.create_marker(marker):
                return marker, True
            found = self.layout.committed_marker(self.shard_id)
            if isinstance(found, BrokenMarker):
                # A marker that is there but unreadable (seen with retried conditional PUTs on
                # moto: an empty body): this attempt's files are published, so its marker
                # replaces the broken one.
                self.layout.replace_marker(marker)
                return marker, True
        if found is None:  # refused, yet gone: someone is wiping the output
            raise TransientError(f"shard {self.shard_id}: its marker was refused as existing "
                                 "but cannot be read", shard_id=self.shard_id)
        # An earlier request of ours may have landed before a retried PUT was refused.
        return found, found.attempt_token == marker.attempt_token

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
        raise ShardError(f"input files of one shard have incompatible columns: {exc}") from exc

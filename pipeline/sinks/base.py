"""What every output sink provides: part files (worker side) and a run commit (driver side).

Markers and exactly-once stay in ``pipeline.commit``: a sink only decides where a shard's rows
go and how one run's shards become visible to readers. The Parquet sink makes them visible
shard by shard (a part file per shard); table sinks (Delta, Lance) write each shard's files
unseen and publish a whole run in one table commit at its end.

Worker side, ``ShardWriter`` (``pipeline.commit``) streams a shard's rows into the part file
its sink's ``PartFiles`` stages, and calls it at three points of the commit:

    stage(path)              before the first row: where this attempt's part file is written
    finished(staged, rows)   every row written, nothing visible yet (Lance writes fragments)
    publish(staged)          under the commit step, while the shard has no marker
    marker_fields()          merged into the marker (Lance: the fragments it wrote)

Driver side, ``commit_run`` runs once every shard of a run is committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from pipeline import storage
from pipeline.layout import OutputLayout
from pipeline.spec import IndexSpec
from pipeline.state import ShardMarker


class PartFiles(Protocol):
    """How a sink stores one attempt's part file (see the module doc for when each runs)."""

    def stage(self, path: str) -> storage.StagedFile:
        """The file this attempt writes the part into; nothing is visible at ``path`` yet."""
        ...

    def finished(self, staged: storage.StagedFile, rows: int) -> None:
        """Every row is in ``staged`` (closed, durable) and nothing is published."""
        ...

    def publish(self, staged: storage.StagedFile) -> None:
        """Make the staged part the shard's rows (the caller holds the commit step)."""
        ...

    def marker_fields(self) -> dict[str, Any]:
        """Fields of ``ShardMarker`` this sink sets about the published rows."""
        ...


class FileParts:
    """Part files at their final names: staged beside them, renamed or completed to publish
    (Parquet and Delta output)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def stage(self, path: str) -> storage.StagedFile:
        return storage.StagedFile(self.fs, path)

    def finished(self, staged: storage.StagedFile, rows: int) -> None:
        pass

    def publish(self, staged: storage.StagedFile) -> None:
        staged.publish()

    def marker_fields(self) -> dict[str, Any]:
        return {}


@dataclass
class RunCommit:
    """One run's end, as the driver hands it to a sink's ``commit_run``.

    ``live``: every shard the output holds after this run (shard id -> its marker), the ones
    kept from earlier runs included. ``dropped``: shards replaced or retired by this run (shard
    id -> marker), whose rows must leave the table in the same commit.
    """

    run_id: int
    fingerprint: str
    live: dict[str, ShardMarker]
    dropped: dict[str, ShardMarker] = field(default_factory=dict)
    index: IndexSpec | None = None  # output.index (Lance), None when not asked for
    # Shards this run computed (merge: the rows it upserts); None: not known, every live one.
    added: set[str] | None = None
    token: str | None = None  # the run's own token (RunManifest.token), named by merge commits


class Sink(Protocol):
    format: str  # parquet | delta | lance
    # Table sinks keep the files of dropped shards on storage (older versions read them);
    # the Parquet sink deletes them when the run completes.
    keeps_dropped_files: bool

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        """Worker side: how one attempt of ``shard_id`` stores its part file."""
        ...

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        """Driver side, after every shard of the run is committed: make the run visible to
        readers in one step. Idempotent: called again for the same run (after a crash) it
        commits nothing new. Returns what the run manifest records, e.g. {"version": 3}."""
        ...

    def read(self, layout: OutputLayout) -> pa.Table:
        """The output as a reader of this format sees it now."""
        ...

    def table_dirs(self) -> tuple[str, ...]:
        """Folders under the output root that belong to the table (wiped by --fresh)."""
        ...

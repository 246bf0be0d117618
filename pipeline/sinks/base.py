"""What every output sink provides: a shard writer (worker side) and a run commit (driver side).

Markers and exactly-once stay in ``pipeline.commit``: a sink only decides where a shard's rows
go and how one run's shards become visible to readers. The Parquet sink makes them visible
shard by shard (a part file per shard); table sinks (Delta, Lance) write each shard's files
unseen and publish a whole run in one table commit at its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.commit import OutputLayout, ShardWriter


@dataclass
class RunCommit:
    """One run's end, as the driver hands it to a sink's ``commit_run``.

    ``live``: every shard the output holds after this run (shard id -> its marker), the ones
    kept from earlier runs included. ``dropped``: shards replaced or retired by this run (shard
    id -> marker), whose rows must leave the table in the same commit.
    """

    run_id: int
    fingerprint: str
    live: dict[str, dict[str, Any]]
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)
    index: dict[str, Any] | None = None  # output.index (Lance), None when not asked for


class Sink(Protocol):
    format: str  # parquet | delta | lance
    # Table sinks keep the files of dropped shards on storage (older versions read them);
    # the Parquet sink deletes them when the run completes.
    keeps_dropped_files: bool

    def shard_writer(self, layout: OutputLayout, shard_id: str, compression: str,
                     metadata: dict[bytes, bytes]) -> ShardWriter:
        """Worker side: streams one shard's rows; ``commit`` makes the shard's marker."""
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

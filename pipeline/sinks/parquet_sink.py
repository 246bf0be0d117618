"""Parquet output: one part file per shard, visible to readers as soon as the shard commits."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import OutputLayout
from pipeline.sinks.base import FileParts, PartFiles, RunCommit


class ParquetSink:
    format = "parquet"
    keeps_dropped_files = False  # a run's end deletes the part files of replaced shards

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        return FileParts(layout.fs)

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        # Nothing to publish: every part file went live with its marker.
        return {"files": len(run.live)}

    def read(self, layout: OutputLayout) -> pa.Table:
        """Every committed part file (a shard with a marker), in shard id order."""
        tables = []
        for sid in sorted(layout.committed_shards()):
            with layout.fs.open(layout.part_path(sid), "rb") as fh:
                tables.append(pq.read_table(fh))
        if not tables:
            return pa.table({})
        # Files of one output may differ in types (an int32 id in a later input file).
        return pa.concat_tables(tables, promote_options="permissive")

    def table_dirs(self) -> tuple[str, ...]:
        return ()

"""Delta Lake output through ``deltalake``: part files per shard, one Delta commit per run.

Workers write ``part-<shard>.parquet`` at the table root exactly as for Parquet output (the
same staging, markers and exactly-once rules). Nothing is in the table until the run's end,
when one transaction adds the part files of the shards committed in this run and removes the
files of replaced or retired shards: readers see the table before the run or after it.

The commit is idempotent twice over: it carries a Delta transaction identifier (app id = the
job fingerprint, version = the run id), and a run whose identifier the table already holds
is not committed again; and its actions are the difference between the table's files and the
shards the output holds, so a repeated commit would have nothing to add or remove.

Removed files stay on storage, so time travel reads every earlier run;
``DeltaTable(uri).vacuum(...)`` deletes them once no reader needs them. Delta has no
fixed-size list type: embeddings read back as ``list<float>``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import OutputError, cause_text
from pipeline.layout import OutputLayout, shard_of_part
from pipeline.metadata import COMMIT_FINGERPRINT, COMMIT_RUN
from pipeline.sinks.base import FileParts, PartFiles, RunCommit
from pipeline.sinks.object_store import object_store_options, table_path
from pipeline.state import ShardMarker


class DeltaSink:
    format = "delta"
    keeps_dropped_files = True  # earlier versions still read them (vacuum removes them)

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        return FileParts(layout.fs)  # part files at the table root, exactly as for Parquet

    def _open(self, layout: OutputLayout):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(table_path(layout.uri), storage_options=self._options(layout))
        except TableNotFoundError:
            return None

    def _options(self, layout: OutputLayout) -> dict[str, str]:
        return object_store_options(layout.uri, layout.storage_options)

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        table = self._open(layout)
        wanted = {layout.part_path(sid).rsplit("/", 1)[-1]: marker
                  for sid, marker in run.live.items() if marker.rows_out > 0}
        present = self._files(table, layout) if table is not None else {}
        done = table.transaction_version(run.fingerprint) if table is not None else None
        if done is not None and done >= run.run_id and set(wanted) == set(present):
            # Committed before a crash or a retry. (A resumed run whose input changed again
            # after its commit is not in sync: it commits the difference, same run id.)
            return {"version": table.version(), "committed": False,
                    "note": f"run {run.run_id} was already committed"}
        if table is None and not wanted:  # no row yet: Delta takes no table without columns
            return {"version": None, "committed": False,
                    "note": f"run {run.run_id} has no rows: no Delta table yet"}
        adds, removes = self._actions(layout, wanted, present, run.added)
        schema = self._schema(layout, [a.path for a in adds] or sorted(wanted), table)
        self._write(layout, table, run, [*adds, *removes], schema)
        table = self._open(layout)
        return {"version": table.version() if table is not None else None, "committed": True,
                "added_files": len(adds), "removed_files": len(removes)}

    def _actions(self, layout: OutputLayout, wanted: dict[str, ShardMarker],
                 present: dict[str, int], added: set[str] | None) -> tuple[list[Any], list[Any]]:
        """Add the part files of live shards the table lacks, remove those of dropped ones.
        A shard of an earlier run whose part file the table no longer holds was compacted or
        rewritten by another writer: adding it again would duplicate its rows, so the commit
        is refused."""
        from deltalake.transaction import AddAction, RemoveAction

        sizes = self._sizes(layout)
        now = int(time.time() * 1000)
        adds = []
        for name, marker in sorted(wanted.items()):
            if name in present:
                continue
            if added is not None and marker.shard_id not in added:
                raise OutputError(
                    f"output.uri: the Delta table at {layout.uri} no longer holds {name} of "
                    f"shard {marker.shard_id}, committed by an earlier run (compacted, or "
                    "rewritten by another writer); adding it again would duplicate its rows: "
                    "rerun with --fresh to rebuild the output")
            if name not in sizes:
                raise OutputError(f"output.uri: {layout.uri}/{name} is missing, but shard "
                                  f"{marker.shard_id} is committed; rerun with --fresh")
            adds.append(AddAction(name, sizes[name], {}, now, True,
                                  json.dumps({"numRecords": marker.rows_out})))
        removes = [RemoveAction(name, True, now, size, {})
                   for name, size in sorted(present.items()) if name not in wanted]
        return adds, removes

    def _write(self, layout: OutputLayout, table: Any, run: RunCommit, actions: list[Any],
               schema: Any) -> None:
        """One transaction, tagged with the run (app id = fingerprint, version = run id)."""
        from deltalake.transaction import (
            CommitProperties,
            Transaction,
            create_table_with_add_actions,
        )

        commit = CommitProperties(
            app_transactions=[Transaction(run.fingerprint, run.run_id)],
            custom_metadata={COMMIT_RUN: run.run_id, COMMIT_FINGERPRINT: run.fingerprint})
        try:
            if table is None:
                create_table_with_add_actions(table_path(layout.uri), schema, actions,
                                              mode="error", storage_options=self._options(layout),
                                              commit_properties=commit)
            else:
                table.create_write_transaction(actions, "append", schema,
                                               commit_properties=commit)
        except Exception as exc:  # deltalake raises its own and pyarrow's error types
            raise OutputError(f"output.uri: Delta commit of run {run.run_id} to {layout.uri} "
                              f"failed ({cause_text(exc)})") from exc

    @staticmethod
    def _files(table: Any, layout: OutputLayout) -> dict[str, int]:
        """The table's files that are this output's part files: files other writers added
        are never removed by a run's commit."""
        actions = pa.table(table.get_add_actions(flatten=True))  # arro3 -> pyarrow (C stream)
        data = actions.select(["path", "size_bytes"]).to_pylist()
        return {row["path"].rsplit("/", 1)[-1]: row["size_bytes"] for row in data
                if "/" not in row["path"] and shard_of_part(row["path"]) is not None}

    @staticmethod
    def _sizes(layout: OutputLayout) -> dict[str, int]:
        """Sizes of the part files at the root, from one listing."""
        layout.fs.invalidate_cache(layout.root)
        try:
            entries = layout.fs.ls(layout.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e["name"].rsplit("/", 1)[-1].startswith("part-")}

    @staticmethod
    def _schema(layout: OutputLayout, names: list[str], table: Any):
        from deltalake import Schema

        if not names:  # a run that adds no rows: the table's schema, or an empty one
            if table is not None:
                return table.schema()
            return Schema.from_arrow(pa.schema([]))
        with layout.fs.open(f"{layout.root}/{names[0]}", "rb") as fh:
            schema = pq.read_schema(fh).remove_metadata()
        return Schema.from_arrow(schema)

    def read(self, layout: OutputLayout) -> pa.Table:
        table = self._open(layout)
        return table.to_pyarrow_table() if table is not None else pa.table({})

    def table_dirs(self) -> tuple[str, ...]:
        return ("_delta_log",)

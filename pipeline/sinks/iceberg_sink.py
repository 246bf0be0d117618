"""Apache Iceberg output through ``pyiceberg``: part files per shard, one snapshot per run.

Workers write ``part-<shard>.parquet`` under ``output.uri`` exactly as for Parquet output (the
same staging, markers and exactly-once rules); ``output.uri`` also keeps the job's state
(``_pipeline/``). Nothing is in the table until the run's end, when one snapshot adds the
part files of shards committed in this run and removes the files of replaced or retired
shards (an ``overwrite`` snapshot; an ``append`` when nothing is removed). The table
(``output.table`` in ``output.catalog``) is created on the first run from the part files'
schema, with a name mapping so any Iceberg reader resolves the files' columns.

Idempotent: the snapshot summary carries ``pipeline.run`` and ``pipeline.fingerprint``, and
the actions are the difference between the table's files (those under ``output.uri``: files
other writers added are never touched) and the shards the output holds, so a commit retried
after a driver crash finds its run's files in the table and adds nothing. A commit that loses
a race with another writer (``CommitFailedException``) is planned again from the table's new
state and retried: neither writer's files are lost.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError, cause_text
from pipeline.layout import OutputLayout, shard_of_part
from pipeline.metadata import COMMIT_FINGERPRINT, COMMIT_RUN
from pipeline.sinks.base import FileParts, PartFiles, RunCommit
from pipeline.sources.iceberg import open_catalog

COMMIT_ATTEMPTS = 5


class IcebergSink:
    format = "iceberg"
    keeps_dropped_files = True  # older snapshots still read them (expire_snapshots removes them)

    def __init__(self, table: str | None = None, catalog: dict[str, Any] | None = None) -> None:
        self.table_name = table
        self.catalog_props = catalog or {}

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        return FileParts(layout.fs)

    def _catalog(self, layout: OutputLayout) -> Any:
        return open_catalog(self.catalog_props, layout.storage_options, "output.catalog")

    def _load(self, catalog: Any) -> Any:
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return catalog.load_table(self.table_name)
        except NoSuchTableError:
            return None

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        from pyiceberg.exceptions import CommitFailedException

        catalog = self._catalog(layout)
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return self._commit(layout, run, catalog)
            except CommitFailedException as exc:  # another writer committed first: replan
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise OutputError(f"output.table: {self.table_name}: run {run.run_id} lost "
                                      f"{COMMIT_ATTEMPTS} commit races "
                                      f"({cause_text(exc, self.catalog_props)})") from exc
                time.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _commit(self, layout: OutputLayout, run: RunCommit, catalog: Any) -> dict[str, Any]:
        wanted = {self._uri(layout, sid): layout.part_path(sid)
                  for sid, marker in run.live.items() if marker.rows_out > 0}
        table = self._load(catalog)
        if table is None:
            if not wanted:
                return {"snapshot": None, "committed": False,
                        "note": f"run {run.run_id} has no rows: no Iceberg table yet"}
            table = self._create(layout, catalog, wanted[sorted(wanted)[0]])
        present = self._ours(layout, table)
        adds = sorted(set(wanted) - set(present))
        gone = [p for p in adds if run.added is not None and shard_of_part(p) not in run.added]
        if gone:  # compacted or rewritten by another writer: re-adding would duplicate rows
            raise OutputError(
                f"output.table: {self.table_name} no longer holds {gone[0]}, committed by an "
                "earlier run (rewritten by rewrite_data_files or another writer); adding it "
                "again would duplicate its rows: rerun with --fresh to rebuild the output")
        self._ensure_name_mapping(table)
        removes = [present[p] for p in sorted(set(present) - set(wanted))]
        if not adds and not removes:
            snapshot = table.current_snapshot()
            return {"snapshot": snapshot.snapshot_id if snapshot else None, "committed": False,
                    "note": f"run {run.run_id} was already committed"
                    if self._has_run(table, run) else "nothing to change"}
        layout.fs.invalidate_cache(layout.root)
        missing = [p for p in adds if not layout.fs.exists(wanted[p])]
        if missing:
            raise OutputError(f"output.uri: {missing[0]} is missing, but its shard is "
                              "committed; rerun with --fresh")
        props = {COMMIT_RUN: str(run.run_id), COMMIT_FINGERPRINT: run.fingerprint}
        from pyiceberg.io.pyarrow import parquet_file_to_data_file

        with table.transaction() as tx:
            producer = tx.update_snapshot(snapshot_properties=props)
            with (producer.overwrite() if removes else producer.fast_append()) as update:
                for data_file in removes:
                    update.delete_data_file(data_file)
                for path in adds:
                    update.append_data_file(parquet_file_to_data_file(
                        table.io, tx.table_metadata, path))
        table = catalog.load_table(self.table_name)
        return {"snapshot": table.current_snapshot().snapshot_id, "committed": True,
                "added_files": len(adds), "removed_files": len(removes)}

    def _create(self, layout: OutputLayout, catalog: Any, first: str) -> Any:
        from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError

        with layout.fs.open(first, "rb") as fh:
            schema = iceberg_ready(pq.read_schema(fh).remove_metadata())
        namespace = self.table_name.rsplit(".", 1)[0] if "." in str(self.table_name) else None
        if namespace:
            with contextlib.suppress(NamespaceAlreadyExistsError):
                catalog.create_namespace(namespace)
        try:
            table = catalog.create_table(self.table_name, schema=schema)
        except TableAlreadyExistsError:  # created by a crashed attempt of this run
            table = catalog.load_table(self.table_name)
        self._ensure_name_mapping(table)
        return catalog.load_table(self.table_name)

    @staticmethod
    def _ensure_name_mapping(table: Any) -> None:
        """Readers resolve the part files' columns by name (they carry no field ids); set
        when the table is created, and again here should a crash have come in between."""
        from pyiceberg.table import TableProperties

        if TableProperties.DEFAULT_NAME_MAPPING in table.properties:
            return
        with table.transaction() as tx:
            tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING:
                                 tx.table_metadata.schema().name_mapping.model_dump_json()})

    def _uri(self, layout: OutputLayout, shard_id: str) -> str:
        return storage.full_uri(layout.fs, layout.part_path(shard_id))

    def _ours(self, layout: OutputLayout, table: Any) -> dict[str, Any]:
        """The table's current data files that this output wrote (under output.uri)."""
        snapshot = table.current_snapshot()
        if snapshot is None:
            return {}
        root = storage.full_uri(layout.fs, layout.root).rstrip("/") + "/"  # s3a:// -> s3://
        files: dict[str, Any] = {}
        for task in table.scan(snapshot_id=snapshot.snapshot_id).plan_files():
            path = task.file.file_path
            if path.startswith(root) and "/" not in path[len(root):] and shard_of_part(path):
                files[path] = task.file
        return files

    @staticmethod
    def _has_run(table: Any, run: RunCommit) -> bool:
        return any(s.summary is not None and s.summary.get(COMMIT_RUN) == str(run.run_id)
                   and s.summary.get(COMMIT_FINGERPRINT) == run.fingerprint
                   for s in table.snapshots())

    def read(self, layout: OutputLayout) -> pa.Table:
        table = self._load(self._catalog(layout))
        return table.scan().to_arrow() if table is not None else pa.table({})

    def drop(self, layout: OutputLayout) -> None:
        """--fresh: the table goes with its history (its files are the output's part files)."""
        catalog = self._catalog(layout)
        if self._load(catalog) is not None:
            catalog.drop_table(self.table_name)

    def table_dirs(self) -> tuple[str, ...]:
        return ()


def iceberg_ready(schema: pa.Schema) -> pa.Schema:
    """Iceberg has no fixed-size lists or unsigned ints: the table declares lists and wider
    signed ints (the files keep their types; readers cast)."""
    def convert(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return pa.list_(t.value_field.with_type(convert(t.value_type)))
        if pa.types.is_list(t):
            return pa.list_(t.value_field.with_type(convert(t.value_type)))
        if pa.types.is_unsigned_integer(t):
            return pa.int64() if t.bit_width >= 32 else pa.int32()
        return t
    return pa.schema([f.with_type(convert(f.type)) for f in schema])

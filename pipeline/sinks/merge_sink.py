"""``output.mode: merge``: each run upserts its rows into a table by ``output.key``.

Workers stage each shard's rows as a Parquet part file under ``output.uri`` with the usual
markers (the exactly-once rules are the same as for every sink). At the run's end the driver
streams the rows of the shards this run computed into one merge commit of the target table:

- Delta: ``DeltaTable.merge`` (update all columns where the key matches, insert the rest),
  with schema evolution, so new prediction columns are added to an existing table; the
  commit carries a Delta transaction identifier (app id = job fingerprint, version = run id);
- Lance: ``merge_insert`` on the key, committed with ``pipeline.run_id`` in the transaction
  properties;
- Iceberg: pyiceberg ``upsert`` on the key, ``pipeline.run`` in the snapshot summary.

Replayed after a crash (the commit made, the run manifest not), a run finds its own commit in
the table (transaction version, transaction properties or snapshot summary) and adds nothing.
Keys that appear twice in one run's rows are refused, naming the key, before anything is
written. A merge never deletes target rows.

The target is ``output.table`` (Iceberg: namespace.name in ``output.catalog``; Delta and
Lance: the table's URI, which may be the job's input table: predictions written back as new
columns), or ``output.uri`` itself for Delta and Lance. The rows of a run are read on the
driver: Delta and Lance merge them as a stream; pyiceberg's upsert takes them in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import OutputError, cause_text
from pipeline.layout import OutputLayout
from pipeline.metadata import COMMIT_FINGERPRINT, COMMIT_RUN, COMMIT_RUN_ID, COMMIT_TOKEN
from pipeline.sinks.base import FileParts, PartFiles, RunCommit
from pipeline.sinks.iceberg_sink import IcebergSink, iceberg_ready
from pipeline.sinks.object_store import object_store_options, table_path
from pipeline.spec import OutputSpec


class MergeSink:
    keeps_dropped_files = False  # part files are staging: the table holds the rows

    def __init__(self, output: OutputSpec) -> None:
        self.output = output
        self.format = output.format
        self.key = list(output.key or [])

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        return FileParts(layout.fs)

    def target(self, layout: OutputLayout) -> str:
        return self.output.table or layout.uri

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        shards = sorted(sid for sid, m in run.live.items()
                        if (run.added is None or sid in run.added) and m.rows_out)
        if self._committed(layout, run):
            return {"committed": False, "target": self.target(layout),
                    "note": f"run {run.run_id} was already merged"}
        if not shards:
            return {"committed": False, "target": self.target(layout), "rows": 0,
                    "note": f"run {run.run_id} computed no rows: nothing to merge"}
        check_unique_keys(layout, shards, self.key, run.run_id)
        merge = {"delta": self._delta, "lance": self._lance, "iceberg": self._iceberg}
        try:
            result = merge[self.format](layout, run, shards)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"output.table: merging run {run.run_id} into "
                              f"{self.target(layout)} failed "
                              f"({cause_text(exc, layout.storage_options, self.output.catalog)})"
                              ) from exc
        return {"committed": True, "target": self.target(layout), "key": self.key,
                "merged_shards": len(shards), **result}

    # ------------------------------------------------------------------------- Delta

    def _delta_options(self, layout: OutputLayout) -> dict[str, str]:
        return object_store_options(self.target(layout), layout.storage_options)

    def _open_delta(self, layout: OutputLayout) -> Any:
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(table_path(self.target(layout)),
                              storage_options=self._delta_options(layout))
        except TableNotFoundError:
            return None

    def _delta(self, layout: OutputLayout, run: RunCommit, shards: list[str]) -> dict[str, Any]:
        from deltalake import write_deltalake
        from deltalake.transaction import CommitProperties, Transaction

        commit = CommitProperties(
            app_transactions=[Transaction(_app_id(run), run.run_id)],
            custom_metadata={**_properties(run, COMMIT_RUN)})
        table = self._open_delta(layout)
        rows = run_rows(layout, shards)
        if table is None:
            write_deltalake(table_path(self.target(layout)), rows, mode="append",
                            storage_options=self._delta_options(layout),
                            commit_properties=commit)
            table = self._open_delta(layout)
            return {"version": table.version(), "inserted": None, "updated": None}
        predicate = " AND ".join(f"t.{_quoted(k)} = s.{_quoted(k)}" for k in self.key)
        stats = (table.merge(rows, predicate, source_alias="s", target_alias="t",
                             merge_schema=True, commit_properties=commit)
                 .when_matched_update_all().when_not_matched_insert_all().execute())
        return {"version": self._open_delta(layout).version(),
                "inserted": stats.get("num_target_rows_inserted"),
                "updated": stats.get("num_target_rows_updated")}

    # ------------------------------------------------------------------------- Lance

    def _lance_options(self, layout: OutputLayout) -> dict[str, str] | None:
        return object_store_options(self.target(layout), layout.storage_options) or None

    def _open_lance(self, layout: OutputLayout) -> Any:
        import lance

        try:
            return lance.dataset(table_path(self.target(layout)),
                                 storage_options=self._lance_options(layout))
        except ValueError as exc:
            if "not found" in str(exc).lower():
                return None
            raise

    def _lance(self, layout: OutputLayout, run: RunCommit, shards: list[str]) -> dict[str, Any]:
        import dataclasses

        import lance
        from lance import LanceDataset

        props = _properties(run, COMMIT_RUN_ID)
        ds = self._open_lance(layout)
        rows = run_rows(layout, shards)
        if ds is None:
            ds = lance.write_dataset(rows, table_path(self.target(layout)),
                                     storage_options=self._lance_options(layout),
                                     transaction_properties=props)
            return {"version": ds.version}
        builder = ds.merge_insert(self.key).when_matched_update_all().when_not_matched_insert_all()
        transaction, stats = builder.execute_uncommitted(rows)
        transaction = dataclasses.replace(transaction, transaction_properties=props)
        ds = LanceDataset.commit(table_path(self.target(layout)), transaction,
                                 read_version=ds.version,
                                 storage_options=self._lance_options(layout))
        return {"version": ds.version, "inserted": stats.get("num_inserted_rows"),
                "updated": stats.get("num_updated_rows")}

    # ------------------------------------------------------------------------- Iceberg

    def _iceberg_sink(self) -> IcebergSink:
        return IcebergSink(self.output.table, self.output.catalog)

    def _iceberg(self, layout: OutputLayout, run: RunCommit, shards: list[str]) -> dict[str, Any]:
        from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError

        sink = self._iceberg_sink()
        catalog = sink._catalog(layout)
        rows = run_rows(layout, shards).read_all()
        props = _properties(run, COMMIT_RUN)
        try:
            table = catalog.load_table(self.output.table)
        except NoSuchTableError:
            namespace = str(self.output.table).rsplit(".", 1)[0]
            with contextlib.suppress(NamespaceAlreadyExistsError):
                catalog.create_namespace(namespace)
            table = catalog.create_table(self.output.table, schema=iceberg_ready(rows.schema))
            table.append(rows.cast(iceberg_ready(rows.schema)), snapshot_properties=props)
            return {"snapshot": catalog.load_table(self.output.table).current_snapshot().snapshot_id}
        rows = rows.cast(iceberg_ready(rows.schema))
        result = table.upsert(rows, join_cols=self.key, snapshot_properties=props)
        return {"snapshot": catalog.load_table(self.output.table).current_snapshot().snapshot_id,
                "inserted": result.rows_inserted, "updated": result.rows_updated}

    # ------------------------------------------------------------------------- replays

    def _committed(self, layout: OutputLayout, run: RunCommit) -> bool:
        """This run's merge is in the table already (a crash after the commit)."""
        if self.format == "delta":
            table = self._open_delta(layout)
            done = table.transaction_version(_app_id(run)) if table is not None else None
            return done is not None and done >= run.run_id
        if self.format == "lance":
            ds = self._open_lance(layout)
            if ds is None:
                return False
            for version in ds.versions()[::-1][:50]:
                tx = ds.read_transaction(version["version"])
                props = (getattr(tx, "transaction_properties", None) or {}) if tx else {}
                if _names_run(props, run, COMMIT_RUN_ID):
                    return True
            return False
        sink = self._iceberg_sink()
        table = sink._load(sink._catalog(layout))
        return table is not None and any(
            s.summary is not None and _names_run(s.summary, run, COMMIT_RUN)
            for s in table.snapshots())

    def read(self, layout: OutputLayout) -> pa.Table:
        if self.format == "delta":
            table = self._open_delta(layout)
            return pa.table(table.to_pyarrow_table()) if table is not None else pa.table({})
        if self.format == "lance":
            ds = self._open_lance(layout)
            return ds.to_table() if ds is not None else pa.table({})
        return self._iceberg_sink().read(layout)

    def table_dirs(self) -> tuple[str, ...]:
        return ()


def _app_id(run: RunCommit) -> str:
    """The Delta transaction app id of a run's merge: its own token where it has one."""
    return f"pipeline-merge-{run.token}" if run.token else run.fingerprint


def _properties(run: RunCommit, run_key: str) -> dict[str, str]:
    props = {run_key: str(run.run_id), COMMIT_FINGERPRINT: run.fingerprint}
    return props | ({COMMIT_TOKEN: run.token} if run.token else {})


def _names_run(props: dict[str, Any], run: RunCommit, run_key: str) -> bool:
    """A commit's properties name this run (its token; the fingerprint and run id for runs
    from before tokens)."""
    if run.token:
        return props.get(COMMIT_TOKEN) == run.token
    return props.get(COMMIT_FINGERPRINT) == run.fingerprint and \
        int(props.get(run_key, -1)) >= run.run_id


def _quoted(name: str) -> str:
    return f"`{name}`" if not name.isidentifier() else name


def _part_batches(layout: OutputLayout, shards: list[str]) -> Iterator[pa.RecordBatch]:
    for sid in shards:
        with layout.fs.open(layout.part_path(sid), "rb") as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=8192)


def run_rows(layout: OutputLayout, shards: list[str]) -> pa.RecordBatchReader:
    """The rows of ``shards`` (their part files) as one stream, schema of the first."""
    with layout.fs.open(layout.part_path(shards[0]), "rb") as fh:
        schema = pq.read_schema(fh).remove_metadata()
    batches = (b.cast(schema) if b.schema != schema else b
               for b in (pa.RecordBatch.from_arrays(b.columns, schema=b.schema.remove_metadata())
                         for b in _part_batches(layout, shards)))
    return pa.RecordBatchReader.from_batches(schema, batches)


def check_unique_keys(layout: OutputLayout, shards: list[str], key: list[str],
                      run_id: int) -> None:
    """OutputError naming a key that appears twice among the run's rows."""
    parts = []
    for sid in shards:
        with layout.fs.open(layout.part_path(sid), "rb") as fh:
            schema = pq.read_schema(fh)
            missing = [k for k in key if k not in schema.names]
            if missing:
                raise OutputError(f"output.key: column {missing[0]!r} is not in the output "
                                  f"(add it to passthrough; the output has "
                                  f"{', '.join(schema.names[:15])})")
            fh.seek(0)
            parts.append(pq.read_table(fh, columns=key))
    keys = pa.concat_tables([p.replace_schema_metadata(None) for p in parts],
                            promote_options="permissive")
    counts = keys.group_by(key).aggregate([([], "count_all")])
    twice = counts.filter(pc.greater(counts["count_all"], 1))
    if twice.num_rows:
        first = twice.slice(0, 1).to_pylist()[0]
        shown = ", ".join(f"{k}={first[k]!r}" for k in key)
        raise OutputError(f"output.key: key ({shown}) appears {first['count_all']} times in "
                          f"run {run_id}'s rows ({twice.num_rows} keys repeat); a merge needs "
                          "one row per key: choose another output.key, or fix the input and "
                          "rerun with input.version set to its new version (a rerun reads "
                          "the version this run started on)")

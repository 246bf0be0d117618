"""Lance output: the output root is one Lance dataset, one version per run.

Worker side (``LanceParts``): a shard's rows are streamed into a local temp Parquet file
(never onto the output store); under the shard's commit step, while the shard has no marker,
they are written as Lance fragment(s) into the dataset's ``data/`` folder, *uncommitted*: no
manifest names them, so no reader sees them. The marker records the fragments
(``{"lance": {"fragments": [FragmentMetadata JSON...], "rows": n, "schema": ...}}``). An
attempt that loses the race for the marker leaves fragments nobody commits: invisible, and
``cleanup_old_versions`` removes them as unreferenced files. Dead letters stay Parquet files
under ``_pipeline/dead_letter`` as with every sink.

Driver side (``commit_run``): one Lance commit per run that adds the fragments of live shards
the dataset does not hold yet and removes the fragments of dropped shards (``Overwrite`` on
the first run, which creates the dataset; ``Update`` afterwards). Fragments are recognised by
their data file paths (unique per write), never by fragment ids (assigned at commit). Called
again for the same run it finds nothing to add or remove and makes no version. The transaction
carries ``pipeline.run_id`` in its properties (``ds.read_transaction(version)``). Tagging each
run's version ``run-<id>`` is opt-in (``LanceSink(tag_runs=True)``): a tag pins its version
against ``cleanup_old_versions`` (which then refuses to run unless told to skip tagged ones),
so every run's files, dropped shards' included, would stay forever.

Not supported: compacting the dataset (``optimize.compact_files``) or writing to it outside the
pipeline and then running more jobs into it. The markers' data files are then gone from the
dataset, so a run cannot tell which shards it holds; ``commit_run`` refuses (``OutputError``)
rather than add rows twice. Compact only an output that takes no further runs, or use --fresh.

Schema metadata: the job-level keys of the part files' Parquet metadata
(``pipeline.fingerprint``, ``pipeline.model_sha256``, ``pipeline.bundle_identity``) are kept
as the Lance schema's metadata (set when the dataset is created); per-shard keys
(``pipeline.shard_id``) and Arrow/pandas bookkeeping keys are dropped.

Concurrent commits: Lance commits by creating the next manifest only if it does not exist
(``If-None-Match: *`` on S3, native on GCS/Azure, link/rename locally) and rebases or rejects
conflicting transactions. S3-compatible stores that ignore conditional PUTs need Lance's
``s3+ddb://bucket/path?ddbTableName=...`` DynamoDB commit store (or a ``commit_lock``); this
pipeline has one committer per output (the driver), so that only matters when other writers
touch the same dataset.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError, ShardError, TransientError, one_line
from pipeline.layout import OutputLayout
from pipeline.metadata import (
    COMMIT_FINGERPRINT,
    COMMIT_RUN_ID,
    COMMIT_SHARDS_ADDED,
    COMMIT_SHARDS_DROPPED,
    JOB_KEYS,
)
from pipeline.sinks.base import PartFiles, RunCommit
from pipeline.sinks.lance_index import build_index, index_plan
from pipeline.sinks.object_store import object_store_options, table_path
from pipeline.state import ShardMarker

READ_BATCH_ROWS = 8192
TABLE_DIRS = ("_versions", "data", "_transactions", "_deletions", "_indices", "_refs")


def _staging_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "pipeline-lance-staging")


def clean_schema(schema: pa.Schema) -> pa.Schema:
    """The schema as the dataset holds it: job-level metadata only."""
    meta = {k: v for k, v in (schema.metadata or {}).items() if k in JOB_KEYS}
    return schema.with_metadata(meta) if meta else schema.remove_metadata()


def _schema_to_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def _schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _fragment_paths(fragment: dict[str, Any]) -> list[str]:
    return [f["path"] for f in fragment.get("files", [])]


def _options(layout: OutputLayout) -> dict[str, str]:
    return object_store_options(layout.uri, layout.storage_options)


# ----------------------------------------------------------------------------- worker side


class LanceParts:
    """Stages the part file locally, then writes it as uncommitted Lance fragments."""

    def __init__(self, layout: OutputLayout, shard_id: str) -> None:
        self.layout = layout
        self.shard_id = shard_id
        self._fragments: list[dict[str, Any]] = []
        self._schema: pa.Schema | None = None

    def stage(self, path: str) -> storage.StagedFile:
        local = os.path.join(_staging_dir(), f"part-{self.shard_id}-{uuid.uuid4().hex}.parquet")
        return storage.StagedFile(fsspec.filesystem("file"), local)

    def finished(self, staged: storage.StagedFile, rows: int) -> None:
        # The fragments are written here, before the commit step and outside the output's
        # commit lock (local disks), so that workers of one machine encode in parallel. An
        # attempt that then finds the shard committed leaves fragments no commit names:
        # invisible, and removed by ``cleanup_old_versions``.
        try:
            parquet = pq.ParquetFile(staged.tmp)
            schema = clean_schema(parquet.schema_arrow)
            self._schema = schema if len(schema) else None
            if rows == 0 or parquet.metadata.num_rows == 0:
                self._fragments = []
                return
            self._fragments = write_fragments(self.layout, _batches(parquet, schema), schema,
                                              self.shard_id)
        finally:
            staged.discard()  # the local temp file, published or not

    def publish(self, staged: storage.StagedFile) -> None:
        """Nothing to move: the fragments are written, and only a run's commit shows them."""

    def marker_fields(self) -> dict[str, Any]:
        return {"lance": {
            "fragments": self._fragments,
            "rows": sum(int(f.get("physical_rows", 0)) for f in self._fragments),
            "schema": _schema_to_text(self._schema) if self._schema is not None else None,
        }}


def _batches(parquet: pq.ParquetFile, schema: pa.Schema) -> pa.RecordBatchReader:
    """The staged rows a batch at a time (memory: one batch, not the shard)."""
    def gen() -> Iterator[pa.RecordBatch]:
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
            yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)
    return pa.RecordBatchReader.from_batches(schema, gen())


def write_fragments(layout: OutputLayout, reader: pa.RecordBatchReader, schema: pa.Schema,
                    shard_id: str) -> list[dict[str, Any]]:
    """Write rows as uncommitted fragments of the dataset; returns their metadata."""
    from lance.fragment import write_fragments as lance_write_fragments

    try:
        fragments = lance_write_fragments(reader, table_path(layout.uri), schema=schema,
                                          mode="append", storage_options=_options(layout))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        # Lance raises a plain OSError for a schema that differs from the dataset's too:
        # that one no retry mends.
        if "schema" in str(exc).lower() or not isinstance(exc, OSError):
            raise ShardError(f"shard {shard_id}: its rows do not fit the Lance dataset at "
                             f"{layout.uri}: {one_line(exc, 400)}", shard_id=shard_id) from exc
        raise TransientError(f"shard {shard_id}: writing Lance fragments to {layout.uri} "
                             f"failed: {one_line(exc, 400)}", shard_id=shard_id) from exc
    return [f.to_json() for f in fragments]


# ----------------------------------------------------------------------------- driver side


@dataclass
class FragmentDelta:
    """What one run's commit changes: fragments to add (with their shard), ids to remove."""

    adding: list[tuple[str, dict[str, Any]]]
    remove_ids: list[int]
    dropped_shards: int

    @property
    def to_add(self) -> list[dict[str, Any]]:
        return [f for _, f in self.adding]


def fragment_delta(uri: str, ds: Any, live: dict[str, dict[str, Any]],
                   dropped: dict[str, dict[str, Any]], run_id: int) -> FragmentDelta:
    """Fragments of live shards the dataset lacks, and those of dropped shards it holds.
    Fragments are known by their data file paths (unique per write), never by fragment ids."""
    live_paths = {p for info in live.values() for f in info["fragments"] for p in _fragment_paths(f)}
    held: dict[str, int] = {}  # data file path -> fragment id, in the dataset now
    if ds is not None:
        for fragment in ds.get_fragments():
            for data_file in fragment.metadata.files:
                held[data_file.path] = fragment.fragment_id
    adding = [(sid, f) for sid in sorted(live) for f in live[sid]["fragments"]
              if not any(p in held for p in _fragment_paths(f))]
    dropped_paths = {p for info in dropped.values() for f in info["fragments"]
                     for p in _fragment_paths(f)} - live_paths
    unknown = set(held) - live_paths - dropped_paths
    if adding and unknown:
        raise OutputError(
            f"output.uri: {uri}: the Lance dataset holds {len(unknown)} data files no shard "
            f"marker names (compacted or written outside the pipeline?), so run {run_id} "
            "cannot tell which shards it already holds; adding could duplicate rows (use "
            "--fresh to rebuild the output)")
    return FragmentDelta(adding, sorted({held[p] for p in dropped_paths if p in held}),
                         len(dropped))


class LanceSink:
    """The output root as a Lance dataset (``lance.dataset(output.uri)`` opens it), with an
    optional vector index (``output.index``: ``pipeline.sinks.lance_index``)."""

    format = "lance"
    keeps_dropped_files = True

    def __init__(self, tag_runs: bool = False) -> None:
        self.tag_runs = tag_runs  # tag each run's version run-<id> (pins it: see the module)

    def part_files(self, layout: OutputLayout, shard_id: str) -> PartFiles:
        return LanceParts(layout, shard_id)

    def table_dirs(self) -> tuple[str, ...]:
        return TABLE_DIRS

    def read(self, layout: OutputLayout) -> pa.Table:
        ds = _open(layout)
        return pa.table({}) if ds is None else ds.to_table()

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        import lance

        ds = _open(layout)
        live = {sid: _lance_info(sid, m) for sid, m in run.live.items()}
        dropped = {sid: _lance_info(sid, m) for sid, m in run.dropped.items()}
        delta = fragment_delta(layout.uri, ds, live, dropped, run.run_id)
        schema = _dataset_schema(layout, ds, live)
        index = index_plan(layout.uri, run.index, schema) if run.index else None
        result: dict[str, Any] = {
            "format": "lance", "uri": layout.uri, "committed": False,
            "added_fragments": len(delta.adding), "removed_fragments": len(delta.remove_ids),
            "added_shards": len({sid for sid, _ in delta.adding}),
            "added_rows": sum(int(f.get("physical_rows", 0)) for f in delta.to_add),
            "notes": [],
        }
        if ds is None and schema is None:
            result.update(version=None, rows=0, tag=None, index=None)
            result["notes"].append("no shard has rows or columns: no dataset created")
            return result
        if delta.adding or delta.remove_ids or ds is None:
            ds = _commit(layout, ds, schema, delta, run)
            result["committed"] = True
        result["data_version"] = ds.version
        result["index"] = (None if index is None else
                           build_index(layout.uri, ds, index, changed=result["committed"]))
        if index is not None:  # the index made a version of its own
            ds = lance.dataset(table_path(layout.uri), storage_options=_options(layout) or None)
        result["version"] = ds.version
        result["rows"] = ds.count_rows()
        result["tag"] = _tag(ds, run.run_id, result["notes"]) if self.tag_runs else None
        return result


def _commit(layout: OutputLayout, ds: Any, schema: pa.Schema | None, delta: FragmentDelta,
            run: RunCommit) -> Any:
    """One Lance commit: ``Overwrite`` creates the dataset on the first run, ``Update`` adds
    and removes fragments afterwards; the transaction names the run."""
    from lance import LanceDataset, LanceOperation
    from lance.dataset import Transaction
    from lance.fragment import FragmentMetadata

    fragments = [FragmentMetadata.from_json(json.dumps(f)) for f in delta.to_add]
    props = {COMMIT_RUN_ID: str(run.run_id), COMMIT_FINGERPRINT: run.fingerprint,
             COMMIT_SHARDS_ADDED: str(len({sid for sid, _ in delta.adding})),
             COMMIT_SHARDS_DROPPED: str(delta.dropped_shards)}
    if ds is None:
        operation, read_version = LanceOperation.Overwrite(schema, fragments), 0
    else:
        operation = LanceOperation.Update(removed_fragment_ids=delta.remove_ids,
                                          new_fragments=fragments)
        read_version = ds.version
    tx = Transaction(read_version=read_version, operation=operation, transaction_properties=props)
    try:
        return LanceDataset.commit(table_path(layout.uri), tx, read_version=read_version or None,
                                   storage_options=_options(layout) or None)
    except Exception as exc:  # lance raises OSError, ValueError, ...
        raise OutputError(f"output.uri: {layout.uri}: Lance commit of run {run.run_id} "
                          f"failed: {one_line(exc, 400)}") from exc


def _open(layout: OutputLayout) -> Any:
    """The dataset now, or None where there is none yet."""
    import lance

    try:
        return lance.dataset(table_path(layout.uri), storage_options=_options(layout) or None)
    except ValueError as exc:  # lance: "Dataset at path ... was not found"
        if "not found" in str(exc).lower():
            return None
        raise OutputError(f"output.uri: {layout.uri}: cannot open the Lance dataset: "
                          f"{one_line(exc, 400)}") from exc
    except OSError as exc:
        raise OutputError(f"output.uri: {layout.uri}: cannot open the Lance dataset: "
                          f"{one_line(exc, 400)}") from exc


def _dataset_schema(layout: OutputLayout, ds: Any,
                    live: dict[str, dict[str, Any]]) -> pa.Schema | None:
    """The dataset's schema (its own, or the one the first commit creates), after checking
    that every live shard's rows have it."""
    schemas = {sid: _schema_from_text(info["schema"]) for sid, info in sorted(live.items())
               if info.get("schema") and info["fragments"]}
    if ds is not None:
        want = ds.schema
    elif schemas:
        want = next(iter(schemas.values()))
    else:  # zero-row shards only: take any schema recorded
        empty = [_schema_from_text(i["schema"]) for i in live.values() if i.get("schema")]
        return empty[0] if empty else None
    for sid, schema in schemas.items():
        if not schema.remove_metadata().equals(want.remove_metadata()):
            raise OutputError(
                f"output.uri: {layout.uri}: shard {sid} has columns {_columns(schema)}, "
                f"the Lance dataset {_columns(want)}; one table cannot hold both "
                "(use --fresh to rebuild the output)")
    return want


def _tag(ds: Any, run_id: int, notes: list[str]) -> str | None:
    """Tag the version readers see after the run ``run-<id>`` (once; cheap: one file)."""
    name = f"run-{run_id}"
    try:
        if name in ds.tags.list():
            return name
        ds.tags.create(name, ds.version)
    except Exception as exc:  # a tag is a convenience: the run is committed
        if "already exists" in str(exc):
            return name
        notes.append(f"tag {name} not created: {one_line(exc, 400)}")
        return None
    return name


def _lance_info(shard_id: str, marker: ShardMarker) -> dict[str, Any]:
    info = marker.lance
    if not isinstance(info, dict) or not isinstance(info.get("fragments"), list):
        raise OutputError(f"shard {shard_id}: its marker records no Lance fragments (written "
                          "by another output format?); use --fresh to rebuild the output")
    return info


def _columns(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"

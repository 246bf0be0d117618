"""Lance output: the output root is one Lance dataset, one version per run.

Worker side (``LanceShardWriter``): a shard's rows are streamed into a local temp Parquet file
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
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.commit import OutputLayout, ShardWriter
from pipeline.errors import OutputError, ShardError, TransientError
from pipeline.metadata import (
    COMMIT_FINGERPRINT,
    COMMIT_RUN_ID,
    COMMIT_SHARDS_ADDED,
    COMMIT_SHARDS_DROPPED,
    JOB_KEYS,
)
from pipeline.sinks.base import RunCommit
from pipeline.sinks.object_store import object_store_options, table_path

# Parquet schema keys kept as Lance schema metadata (job-level, equal across shards).
READ_BATCH_ROWS = 8192
INDEX_TYPES = ("IVF_PQ", "IVF_FLAT", "IVF_SQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_HNSW_FLAT")
INDEX_KEYS = ("column", "metric", "type", "num_partitions", "num_sub_vectors", "num_bits",
              "name", "min_rows")
METRICS = ("cosine", "l2", "dot")


def _staging_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "pipeline-lance-staging")


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


class LanceShardWriter(ShardWriter):
    """Stages the part file locally, then writes it as uncommitted Lance fragments."""

    def __init__(self, sink: LanceSink, layout: OutputLayout, shard_id: str, compression: str,
                 metadata: dict[bytes, bytes]) -> None:
        super().__init__(layout, shard_id, compression, metadata)
        self.sink = sink
        self._fragments: list[dict[str, Any]] = []
        self._schema: pa.Schema | None = None

    def _stage(self, kind: str, path: str) -> storage.StagedFile:
        if kind != "part":
            return super()._stage(kind, path)
        local = os.path.join(_staging_dir(),
                             f"part-{self.shard_id}-{uuid.uuid4().hex}.parquet")
        return storage.StagedFile(fsspec.filesystem("file"), local)

    def _finish(self) -> None:
        # The fragments are written here, before the commit step and outside the output's
        # commit lock (local disks), so that workers of one machine encode in parallel. An
        # attempt that then finds the shard committed leaves fragments no commit names:
        # invisible, and removed by ``cleanup_old_versions``.
        super()._finish()
        self._write_fragments()

    def _publish_part(self) -> None:
        """Nothing to move: the fragments are written, and only a run's commit shows them."""

    def _write_fragments(self) -> None:
        staged = self._files["part"]
        staged.finish()
        try:
            parquet = pq.ParquetFile(staged.tmp)
            schema = clean_schema(parquet.schema_arrow)
            self._schema = schema if len(schema) else None
            if self.rows_out == 0 or parquet.metadata.num_rows == 0:
                self._fragments = []
                return
            self._fragments = self.sink.write_fragments(self.layout, _batches(parquet, schema),
                                                        schema, self.shard_id)
        finally:
            staged.discard()  # the local temp file, published or not

    def marker_extra(self) -> dict[str, Any]:
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


class LanceSink:
    """The output root as a Lance dataset (``lance.dataset(output.uri)`` opens it).

    ``output.index`` (``RunCommit.index``), built or replaced after a run's commit whenever
    the commit changed the data, the index is missing, or it leaves rows unindexed. Keys:

    - ``column``: a ``fixed_size_list<float>`` column; default ``embedding``, else the only
      such column.
    - ``type``: IVF_PQ (default), IVF_FLAT, IVF_SQ, IVF_HNSW_SQ, IVF_HNSW_PQ, IVF_HNSW_FLAT.
    - ``metric``: cosine (default), l2, dot.
    - ``num_partitions``: IVF partitions; default: Lance's own choice (from its target
      partition size). Lance 14 trains fewer than asked where the rows do not fill them (PQ:
      about 256 rows a partition), with a warning in its log.
    - ``num_sub_vectors`` (PQ types): must divide the dimension; default the largest divisor
      of the dimension that is at most dimension / 16 (at least 1).
    - ``num_bits`` (PQ types): default 8. ``name``: default ``<column>_idx``.
    - ``min_rows``: rows below which no index is built; default 2**num_bits (256) for PQ
      types, ``num_partitions`` (or 1) for the others.

    Too few rows: no index is built (an earlier one stays as it is) and the result records
    ``index: {"built": False, "note": "..."}``; the run itself succeeds. (Lance 14 itself would
    build an empty PQ index under 256 rows without a word.) Unknown keys, a missing or
    non-vector column or a bad ``num_sub_vectors`` raise ``OutputError`` before anything is
    committed.
    """

    format = "lance"
    keeps_dropped_files = True

    def __init__(self, tag_runs: bool = False) -> None:
        self.tag_runs = tag_runs  # tag each run's version run-<id> (pins it: see the module)

    # ------------------------------------------------------------------ worker side

    def shard_writer(self, layout: OutputLayout, shard_id: str, compression: str,
                     metadata: dict[bytes, bytes]) -> ShardWriter:
        return LanceShardWriter(self, layout, shard_id, compression, metadata)

    def write_fragments(self, layout: OutputLayout, reader: pa.RecordBatchReader,
                        schema: pa.Schema, shard_id: str) -> list[dict[str, Any]]:
        """Write rows as uncommitted fragments of the dataset; returns their metadata."""
        from lance.fragment import write_fragments

        try:
            fragments = write_fragments(reader, table_path(layout.uri), schema=schema,
                                        mode="append", storage_options=self._options(layout))
        except (OSError, ValueError, TypeError, RuntimeError) as exc:
            # Lance raises a plain OSError for a schema that differs from the dataset's too:
            # that one no retry mends.
            if "schema" in str(exc).lower() or not isinstance(exc, OSError):
                raise ShardError(f"shard {shard_id}: its rows do not fit the Lance dataset at "
                                 f"{layout.uri}: {_one_line(exc)}") from None
            raise TransientError(f"shard {shard_id}: writing Lance fragments to "
                                 f"{layout.uri} failed: {_one_line(exc)}") from None
        return [f.to_json() for f in fragments]

    # ------------------------------------------------------------------ driver side

    def table_dirs(self) -> tuple[str, ...]:
        return ("_versions", "data", "_transactions", "_deletions", "_indices", "_refs")

    def read(self, layout: OutputLayout) -> pa.Table:
        ds = self._open(layout)
        return pa.table({}) if ds is None else ds.to_table()

    def commit_run(self, layout: OutputLayout, run: RunCommit) -> dict[str, Any]:
        import lance
        from lance import LanceDataset, LanceOperation
        from lance.dataset import Transaction
        from lance.fragment import FragmentMetadata

        uri = table_path(layout.uri)
        options = self._options(layout)
        ds = self._open(layout)
        live = {sid: _lance_info(sid, m) for sid, m in run.live.items()}
        dropped = {sid: _lance_info(sid, m) for sid, m in run.dropped.items()}
        live_paths = {p for info in live.values() for f in info["fragments"]
                      for p in _fragment_paths(f)}
        held: dict[str, int] = {}  # data file path -> fragment id, in the dataset now
        if ds is not None:
            for fragment in ds.get_fragments():
                for data_file in fragment.metadata.files:
                    held[data_file.path] = fragment.fragment_id
        adding = [(sid, f) for sid in sorted(live) for f in live[sid]["fragments"]
                  if not any(p in held for p in _fragment_paths(f))]
        to_add = [f for _, f in adding]
        dropped_paths = {p for info in dropped.values() for f in info["fragments"]
                         for p in _fragment_paths(f)} - live_paths
        remove_ids = sorted({held[p] for p in dropped_paths if p in held})
        unknown = set(held) - live_paths - dropped_paths
        if to_add and unknown:
            raise OutputError(
                f"output.uri: {layout.uri}: the Lance dataset holds {len(unknown)} data files "
                "no shard marker names (compacted or written outside the pipeline?), so "
                f"run {run.run_id} cannot tell which shards it already holds; adding "
                "could duplicate rows (use --fresh to rebuild the output)")
        schema = self._schema(layout, ds, live)
        index = self._index_plan(layout, run.index, schema) if run.index else None

        result: dict[str, Any] = {
            "format": "lance", "uri": layout.uri, "committed": False,
            "added_fragments": len(to_add), "removed_fragments": len(remove_ids),
            "added_shards": len({sid for sid, _ in adding}),
            "added_rows": sum(int(f.get("physical_rows", 0)) for f in to_add),
            "notes": [],
        }
        if to_add or remove_ids or ds is None:
            fragments = [FragmentMetadata.from_json(json.dumps(f)) for f in to_add]
            props = {COMMIT_RUN_ID: str(run.run_id), COMMIT_FINGERPRINT: run.fingerprint,
                     COMMIT_SHARDS_ADDED: str(result["added_shards"]),
                     COMMIT_SHARDS_DROPPED: str(len(dropped))}
            if ds is None:
                if schema is None:
                    result.update(version=None, rows=0, tag=None, index=None)
                    result["notes"].append("no shard has rows or columns: no dataset created")
                    return result
                operation = LanceOperation.Overwrite(schema, fragments)
                read_version = 0
            else:
                operation = LanceOperation.Update(removed_fragment_ids=remove_ids,
                                                  new_fragments=fragments)
                read_version = ds.version
            tx = Transaction(read_version=read_version, operation=operation,
                             transaction_properties=props)
            try:
                ds = LanceDataset.commit(uri, tx, read_version=read_version or None,
                                         storage_options=options or None)
            except Exception as exc:  # lance raises OSError, ValueError, ...
                raise OutputError(f"output.uri: {layout.uri}: Lance commit of run {run.run_id} "
                                  f"failed: {_one_line(exc)}") from None
            result["committed"] = True
        result["data_version"] = ds.version
        result["index"] = (None if index is None else
                           self._build_index(layout, ds, index, changed=result["committed"]))
        if index is not None:  # the index made a version of its own
            ds = lance.dataset(uri, storage_options=options or None)
        result["version"] = ds.version
        result["rows"] = ds.count_rows()
        result["tag"] = self._tag(ds, run.run_id, result["notes"]) if self.tag_runs else None
        return result

    # ------------------------------------------------------------------ helpers

    def _options(self, layout: OutputLayout) -> dict[str, str]:
        return object_store_options(layout.uri, layout.storage_options)

    def _open(self, layout: OutputLayout):
        """The dataset now, or None where there is none yet."""
        import lance

        try:
            return lance.dataset(table_path(layout.uri),
                                 storage_options=self._options(layout) or None)
        except ValueError as exc:  # lance: "Dataset at path ... was not found"
            if "not found" in str(exc).lower():
                return None
            raise OutputError(f"output.uri: {layout.uri}: cannot open the Lance dataset: "
                              f"{_one_line(exc)}") from None
        except OSError as exc:
            raise OutputError(f"output.uri: {layout.uri}: cannot open the Lance dataset: "
                              f"{_one_line(exc)}") from None

    def _schema(self, layout: OutputLayout, ds,
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

    def _index_plan(self, layout: OutputLayout, spec: dict[str, Any],
                    schema: pa.Schema | None) -> dict[str, Any]:
        given = {k: v for k, v in spec.items() if v is not None}
        unknown = sorted(set(given) - set(INDEX_KEYS))
        if unknown:
            raise OutputError(f"output.index: unknown keys {unknown} (known: "
                              f"{', '.join(INDEX_KEYS)})")
        kind = str(given.get("type", "IVF_PQ")).upper()
        metric = str(given.get("metric", "cosine")).lower()
        if kind not in INDEX_TYPES:
            raise OutputError(f"output.index.type: {kind!r} is not one of {', '.join(INDEX_TYPES)}")
        if metric not in METRICS:
            raise OutputError(f"output.index.metric: {metric!r} is not one of {', '.join(METRICS)}")
        if schema is None:
            raise OutputError(f"output.index: {layout.uri} has no columns to index")
        vectors = [f.name for f in schema if _is_vector(f.type)]
        column = given.get("column") or ("embedding" if "embedding" in schema.names else
                                         (vectors[0] if len(vectors) == 1 else None))
        if column is None:
            raise OutputError("output.index.column: not given, and the output has no "
                              f"'embedding' column (vector columns: {vectors or 'none'})")
        if column not in schema.names:
            raise OutputError(f"output.index.column: {column!r} is not an output column "
                              f"(columns: {', '.join(schema.names)})")
        field_type = schema.field(column).type
        if not _is_vector(field_type):
            raise OutputError(f"output.index.column: {column!r} is {field_type}, a vector index "
                              "needs fixed_size_list<float>")
        dim = field_type.list_size
        pq_type = "PQ" in kind
        plan: dict[str, Any] = {"column": column, "type": kind, "metric": metric,
                                "name": given.get("name") or f"{column}_idx"}
        if given.get("num_partitions") is not None:
            plan["num_partitions"] = int(given["num_partitions"])
        if pq_type:
            sub = int(given.get("num_sub_vectors") or _default_sub_vectors(dim))
            if sub < 1 or dim % sub:
                raise OutputError(f"output.index.num_sub_vectors: {sub} does not divide the "
                                  f"dimension of {column!r} ({dim})")
            plan["num_sub_vectors"] = sub
            plan["num_bits"] = int(given.get("num_bits", 8))
        default_min = 2 ** plan["num_bits"] if pq_type else 1
        plan["min_rows"] = int(given.get("min_rows") or max(default_min,
                                                             plan.get("num_partitions", 1)))
        return plan

    def _build_index(self, layout: OutputLayout, ds, plan: dict[str, Any],
                     changed: bool) -> dict[str, Any]:
        rows = ds.count_rows()
        out: dict[str, Any] = {k: plan[k] for k in ("column", "type", "metric", "name")}
        existing = _describe_index(ds, plan["name"])
        if (not changed and existing is not None and existing["indexed_rows"] >= rows
                and _same_index(existing, plan)):
            out.update(built=False, note="index is up to date",
                       indexed_rows=existing["indexed_rows"])
            return out
        if rows < plan["min_rows"]:
            out.update(built=False, note=(
                f"index not built: {rows} rows, {plan['type']} needs at least "
                f"{plan['min_rows']} to train" + ("; the previous index stays (it does not "
                                                  "cover new rows)" if existing else "")))
            return out
        kwargs: dict[str, Any] = {k: plan[k] for k in ("num_partitions", "num_sub_vectors")
                                  if k in plan}
        if plan.get("num_bits", 8) != 8:
            kwargs["num_bits"] = plan["num_bits"]
        try:
            ds = ds.create_index(plan["column"], index_type=plan["type"], name=plan["name"],
                                 metric=plan["metric"], replace=True, **kwargs)
        except Exception as exc:
            raise OutputError(f"output.index: building {plan['type']} on {plan['column']!r} "
                              f"of {layout.uri} failed (the run's rows are committed; a "
                              f"rerun retries the index): {_one_line(exc)}") from None
        built = _describe_index(ds, plan["name"]) or {"indexed_rows": 0}
        out.update(built=True, indexed_rows=built["indexed_rows"])
        if built["indexed_rows"] < rows:
            out["note"] = f"{rows - built['indexed_rows']} of {rows} rows are not in the index"
        return out

    def _tag(self, ds, run_id: int, notes: list[str]) -> str | None:
        """Tag the version readers see after the run ``run-<id>`` (once; cheap: one file)."""
        name = f"run-{run_id}"
        try:
            if name in ds.tags.list():
                return name
            ds.tags.create(name, ds.version)
        except Exception as exc:  # a tag is a convenience: the run is committed
            if "already exists" in str(exc):
                return name
            notes.append(f"tag {name} not created: {_one_line(exc)}")
            return None
        return name


def _lance_info(shard_id: str, marker: dict[str, Any]) -> dict[str, Any]:
    info = marker.get("lance")
    if not isinstance(info, dict) or not isinstance(info.get("fragments"), list):
        raise OutputError(f"shard {shard_id}: its marker records no Lance fragments (written "
                          "by another output format?); use --fresh to rebuild the output")
    return info


def _columns(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def _is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def _default_sub_vectors(dim: int) -> int:
    cap = max(1, dim // 16)
    return max(d for d in range(1, cap + 1) if dim % d == 0)


def _describe_index(ds, name: str) -> dict[str, Any] | None:
    """The index ``name`` as ``describe_indices`` tells it (cheap: no centroids), or None."""
    for index in ds.describe_indices():
        if index.name == name:
            details = index.details or {}
            return {"type": str(index.index_type).upper(),
                    "metric": str(details.get("metric_type", "")).lower(),
                    "indexed_rows": int(index.num_rows_indexed or 0)}
    return None


def _same_index(existing: dict[str, Any], plan: dict[str, Any]) -> bool:
    """The existing index has the type and metric asked for."""
    return existing["type"] == plan["type"] and existing["metric"] in ("", plan["metric"])

"""Delta Lake input through ``deltalake``: the data files of one table version from its log.

Each add action of the version is one input file (a Parquet file, cut into shards like any
other). Its identity is its path, size and modification time, plus a hash of the rows its
deletion vector deletes, if it has one. A data file does not hold its partition columns; the
worker adds them from the add action's partition values. Deletion vectors are read through
delta-rs (``DeltaTable.deletion_vectors``: a keep mask per file), whatever their storage.

With ``input.filter`` naming only partition columns, files of other partitions are pruned
from the log alone; any filter is applied to every row by the worker as well.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.arrow_types import encode_schema, plain_schema
from pipeline.errors import InputError, cause_text
from pipeline.listing import InputFile
from pipeline.sinks.object_store import object_store_options, table_path
from pipeline.sources.base import Listing, TableVersion, deletes_id, read_info
from pipeline.sources.filters import conjuncts_over, outside, range_terms
from pipeline.spec import InputSpec


def open_table(uri: str, storage_options: dict[str, Any], version: int | None) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    options = object_store_options(uri, storage_options)
    try:
        table = DeltaTable(table_path(uri), storage_options=options)
    except TableNotFoundError as exc:
        raise InputError(f"input.uri: {uri} is not a Delta table (no _delta_log there)") from exc
    except Exception as exc:
        raise InputError(f"input.uri: cannot open Delta table {uri} "
                         f"({cause_text(exc, storage_options)})") from exc
    if version is not None and version != table.version():
        latest = table.version()
        try:
            table.load_as_version(version)
        except Exception as exc:
            raise InputError(f"input.version: Delta table {uri} has no version {version} "
                             f"(versions up to {latest}; older ones may be vacuumed)") from exc
    return table


def list_delta(spec: InputSpec, version: int | None) -> Listing:
    uri = str(spec.uri)
    table = open_table(uri, spec.storage_options, version)
    schema = plain_schema(pa.schema(table.schema().to_arrow()))
    partitions = list(table.metadata().partition_columns)
    actions = pa.table(table.get_add_actions(flatten=True))
    if (table.metadata().configuration or {}).get("delta.columnMapping.mode", "none") != "none":
        raise InputError(f"input.uri: Delta table {uri} uses column mapping "
                         "(delta.columnMapping.mode), whose data files name columns by id; "
                         "it is not supported yet")
    masks = _deleted_positions(table, uri) if _has_deletion_vectors(table) else {}
    encoded = encode_schema(schema)
    part_schema = pa.schema([schema.field(c) for c in partitions])
    values = _partition_values(actions, partitions, part_schema)
    keep = _partitions_kept(values, part_schema, spec.filter, actions.num_rows)
    keep = [k and s for k, s in zip(keep, _stats_kept(actions, schema, spec.filter), strict=True)]
    files: list[InputFile] = []
    for i, row in enumerate(actions.select(["path", "size_bytes", "modification_time",
                                            "num_records"]).to_pylist()):
        if not keep[i]:
            continue
        file_uri = _file_uri(uri, row["path"])
        deleted = masks.pop(_relative(uri, file_uri), None)
        identity = f"size={row['size_bytes']},mtime={row['modification_time']}"
        if deleted is not None:
            identity += f",dv={deletes_id(deleted.tolist())}"
        records = row["num_records"]
        files.append(InputFile(
            uri=file_uri, format="parquet", size=int(row["size_bytes"]), version=identity,
            columns=list(schema.names), schema=encoded,
            bytes_per_row=row["size_bytes"] / records if records else None,  # sizes shards
            read=read_info(source="delta", table=uri, version=table.version(),
                           partition={c: values[c][i] for c in partitions},
                           partition_schema=encode_schema(part_schema) if partitions else None,
                           dv=deleted is not None)))
    if masks and all(keep):  # a deletion vector no file claims: never score its rows
        raise InputError(f"input.uri: Delta table {uri}: deletion vectors of "
                         f"{sorted(masks)[0]} match no data file of version {table.version()}")
    files.sort(key=lambda f: f.uri)
    return Listing(files, TableVersion("delta", uri, table.version()),
                   pruned=len(keep) - sum(keep))


def _file_uri(root: str, path: str) -> str:
    if "://" in path:
        return path
    from urllib.parse import unquote

    return storage.join(root, unquote(path))


def _partition_values(actions: pa.Table, partitions: list[str],
                      part_schema: pa.Schema) -> dict[str, list[Any]]:
    values: dict[str, list[Any]] = {}
    for name in partitions:
        column = actions[f"partition.{name}"]
        values[name] = [None if v is None else str(v) for v in column.to_pylist()]
    return values


def _partitions_kept(values: dict[str, list[Any]], part_schema: pa.Schema,
                     text: str | None, count: int) -> list[bool]:
    """Which files the filter may keep, judged on their partition values alone."""
    if not text or not values:
        return [True] * count
    typed = pa.table({name: pa.array(values[name], pa.string()).cast(part_schema.field(name).type)
                      for name in part_schema.names})
    expression = conjuncts_over(text, set(part_schema.names), typed.schema)
    if expression is None:
        return [True] * count
    kept = typed.append_column("__row", pa.array(range(count))).filter(expression)
    found = set(kept["__row"].to_pylist())
    return [i in found for i in range(count)]


def _stats_kept(actions: pa.Table, schema: pa.Schema, text: str | None) -> list[bool]:
    """Which files the filter may keep, judged on the log's min/max statistics of integer,
    float and date columns (string statistics may be truncated: never used). A file without
    statistics for a column is kept."""
    keep = [True] * actions.num_rows
    if not text:
        return keep
    for column, op, literals in range_terms(text):
        if column not in schema.names or f"min.{column}" not in actions.column_names:
            continue
        kind = schema.field(column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_date(kind)):
            continue
        try:
            values = [pa.scalar(v).cast(kind).as_py() for v in literals]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            continue  # planning reports a literal that is no value of its column
        lows = actions[f"min.{column}"].to_pylist()
        highs = actions[f"max.{column}"].to_pylist()
        for i, (low, high) in enumerate(zip(lows, highs, strict=True)):
            if keep[i] and low is not None and high is not None and \
                    outside(op, values, low, high):
                keep[i] = False
    return keep


def _has_deletion_vectors(table: Any) -> bool:
    features = table.protocol().reader_features or []
    return "deletionVectors" in features


def _relative(root: str, uri: str) -> str:
    """A data file's path below the table root, unquoted: the one key both the log's paths
    and deletion_vectors()' URIs reduce to."""
    from urllib.parse import unquote

    path = unquote(uri.split("://", 1)[-1])
    base = unquote(table_path(root).split("://", 1)[-1]).rstrip("/") + "/"
    return path[path.find(base) + len(base):] if base in path else path.rsplit("/", 1)[-1]


def _deleted_positions(table: Any, root: str) -> dict[str, np.ndarray]:
    """Deleted row positions of each file that has a deletion vector, by relative path."""
    vectors = pa.table(table.deletion_vectors())
    found: dict[str, np.ndarray] = {}
    for i, path in enumerate(vectors["filepath"].to_pylist()):
        keep = vectors["selection_vector"][i].values.to_numpy(zero_copy_only=False)
        found[_relative(root, path)] = np.flatnonzero(~keep.astype(bool))
    return found


@lru_cache(maxsize=4)
def _version_deletes(table_uri: str, version: int, options_key: str) -> dict[str, np.ndarray]:
    import json

    table = open_table(table_uri, json.loads(options_key), version)
    return _deleted_positions(table, table_uri)


@lru_cache(maxsize=4)
def table_schema(table_uri: str, version: int, options_key: str) -> pa.Schema:
    """Worker side: the table's schema at a version (columns a data file predates)."""
    import json

    table = open_table(table_uri, json.loads(options_key), version)
    return plain_schema(pa.schema(table.schema().to_arrow()))


def deleted_rows(table_uri: str, version: int, options_key: str,
                 file_uri: str) -> np.ndarray | None:
    """Worker side: the deleted positions of one data file of a table version (the version's
    deletion vectors are read once per process)."""
    return _version_deletes(table_uri, version, options_key).get(_relative(table_uri, file_uri))

"""Worker side: one piece of a shard as tables, whatever its source.

A loose file's piece is read by ``pipeline.formats``. A table's data file is read the same
way (a Parquet row range, windowed), then the rows its deletes remove are dropped by their
position in the file (Delta deletion vectors, Iceberg position deletes) and the partition
values a Delta data file does not hold are added. A Lance fragment is read by lance, its
deletion file applied. Memory stays bounded by the window, as for files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.arrow_types import decode_schema, plain_table
from pipeline.formats import iter_piece, windows
from pipeline.sources import delta, iceberg
from pipeline.sources.lance_source import lance_batches


def read_piece(piece: Any, columns: list[str] | None, window_rows: int,
               storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    if not piece.read:
        fs, path = storage.filesystem(piece.uri, storage_options)
        yield from iter_piece(fs, path, piece, columns, window_rows, piece.uri)
        return
    info = json.loads(piece.read)
    if info["source"] == "lance":
        stream = lance_batches(info, piece, columns, min(window_rows, 4096), storage_options)
        yield from windows((plain_table(t) for t in stream), window_rows)
        return
    yield from _data_file(info, piece, columns, window_rows, storage_options)


def _data_file(info: dict[str, Any], piece: Any, columns: list[str] | None, window_rows: int,
               storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """A Delta or Iceberg Parquet data file: deletes dropped, partition values added."""
    partition = info.get("partition") or {}
    part_schema = decode_schema(info["partition_schema"]) if info.get("partition_schema") else None
    in_file = None if columns is None else [c for c in columns if c not in partition]
    deleted = _deleted(info, piece.uri, storage_options)
    position = piece.start if piece.kind == "rows" else 0
    fs, path = storage.filesystem(piece.uri, storage_options)
    names = _file_names(info, fs, path, in_file, storage_options) if in_file else {}
    read = None if in_file is None else [names[c] for c in in_file if names.get(c)]
    for table in iter_piece(fs, path, piece, read, window_rows, piece.uri):
        table = _as_table_columns(table, in_file, names, info, storage_options)
        rows = table.num_rows
        if deleted is not None and deleted.size and rows:
            here = np.arange(position, position + rows)
            table = table.filter(pa.array(~np.isin(here, deleted)))
        position += rows
        for name, value in partition.items():
            if columns is not None and name not in columns:
                continue
            column_type = part_schema.field(name).type if part_schema is not None else pa.string()
            table = table.append_column(name, pa.array([value] * table.num_rows,
                                                       pa.string()).cast(column_type))
        yield table.select(columns) if columns is not None else table


def _file_names(info: dict[str, Any], fs: Any, path: str, columns: list[str],
                storage_options: dict[str, Any]) -> dict[str, str | None]:
    """Each table column's name in this data file, None where the file predates the column
    (schema evolution). Iceberg matches by field id where the file has them (a renamed
    column keeps its id), else by name (files added with a name mapping)."""
    with fs.open(path, "rb") as fh:
        file_schema = pq.read_schema(fh)
    by_id: dict[int, str] = {}
    for field in file_schema:
        raw = (field.metadata or {}).get(b"PARQUET:field_id")
        if raw is not None:
            by_id[int(raw)] = field.name
    ids = iceberg.field_ids(info, storage_options) if info["source"] == "iceberg" and by_id \
        else {}
    names: dict[str, str | None] = {}
    for name in columns:
        if name in ids:
            names[name] = by_id.get(ids[name])
        else:
            names[name] = name if name in file_schema.names else None
    return names


def _as_table_columns(table: pa.Table, columns: list[str] | None, names: dict[str, str | None],
                      info: dict[str, Any], storage_options: dict[str, Any]) -> pa.Table:
    """A data file's window under the table's column names, with columns it lacks as nulls
    of the table's type."""
    if columns is None:
        return table
    out: dict[str, Any] = {}
    schema = None
    for name in columns:
        source = names.get(name)
        if source is not None:
            out[name] = table[source]
            continue
        schema = schema or _table_schema(info, storage_options)
        out[name] = pa.nulls(table.num_rows, schema.field(name).type)
    return pa.table(out)


def _table_schema(info: dict[str, Any], storage_options: dict[str, Any]) -> pa.Schema:
    if info["source"] == "iceberg":
        return iceberg.table_schema(info, storage_options)
    key = json.dumps(storage_options, sort_keys=True, default=str)
    return delta.table_schema(info["table"], info["version"], key)


def _deleted(info: dict[str, Any], uri: str, storage_options: dict[str, Any]) -> np.ndarray | None:
    if info["source"] == "iceberg":
        return iceberg.deleted_positions(info, uri, storage_options)
    if info["source"] == "delta" and info.get("dv"):
        key = json.dumps(storage_options, sort_keys=True, default=str)
        return delta.deleted_rows(info["table"], info["version"], key, uri)
    return None

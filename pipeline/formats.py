"""Reading Arrow tables from Parquet, Arrow IPC, CSV and JSON Lines through fsspec."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc",
    ".csv": "csv", ".csv.gz": "csv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl",
}


def format_of(path: str, default: str | None) -> str | None:
    name = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return default


def _project(table: pa.Table, columns: list[str] | None) -> pa.Table:
    if columns is None:
        return table
    return table.select([c for c in columns if c in table.column_names])


def read_table(
    fs,
    path: str,
    fmt: str,
    columns: list[str] | None,
    row_groups: tuple[int, int] | None = None,
) -> pa.Table:
    """Read one shard: a row-group range of a Parquet file, or a whole file otherwise."""
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as fh:
        if fmt == "parquet":
            pf = pq.ParquetFile(fh)
            groups = list(range(*row_groups)) if row_groups else list(range(pf.num_row_groups))
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            return pf.read_row_groups(groups, columns=cols)
        data = fh.read()
    if fmt == "ipc":
        try:
            table = ipc.open_file(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid:
            table = ipc.open_stream(pa.BufferReader(data)).read_all()
        return _project(table, columns)
    if fmt == "csv":
        opts = pacsv.ConvertOptions(include_columns=columns) if columns else None
        return pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    if fmt == "jsonl":
        return _project(pajson.read_json(io.BytesIO(data)), columns)
    raise ValueError(f"unknown format {fmt}")


def read_schema(fs, path: str, fmt: str) -> pa.Schema:
    """The schema without reading the data (a footer, or the first block)."""
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as fh:
        if fmt == "parquet":
            return pq.ParquetFile(fh).schema_arrow
        if fmt == "ipc":
            data = fh.read()
            try:
                return ipc.open_file(pa.BufferReader(data)).schema
            except pa.ArrowInvalid:
                return ipc.open_stream(pa.BufferReader(data)).schema
        head = fh.read(1 << 20)
    if fmt == "csv":
        return pacsv.open_csv(io.BytesIO(head)).schema
    # JSON Lines: infer from the complete lines of the first block.
    complete = head[: head.rfind(b"\n") + 1] or head
    return pajson.read_json(io.BytesIO(complete)).schema

"""Reading Arrow tables from Parquet, Arrow IPC, CSV, JSON Lines and image files through
fsspec. An image file (``input.format: images``) is one row: ``path`` (its URI) and ``image``
(its bytes, decoded by the task), as Ray Data's ``read_images`` with ``include_paths``."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from fsspec.utils import read_block

from pipeline.arrow_types import plain_table
from pipeline.errors import ShardError

EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc",
    ".csv": "csv", ".csv.gz": "csv",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl",
}


# Read only with input.format: images, so that a stray picture never joins a table input.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp")
IMAGE_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary())])


def format_of(path: str, default: str | None) -> str | None:
    name = path.lower()
    if default == "images":
        return "images" if name.endswith(IMAGE_EXTENSIONS) else None
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return default


PARQUET_BUFFER = 1 << 20


def _check_columns(table: pa.Table, columns: list[str] | None, where: str) -> pa.Table:
    if columns is None:
        return table
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ShardError(f"{where}: column {missing[0]!r} is missing "
                         f"(has: {', '.join(table.column_names[:15])})")
    return table.select(columns)


def windows(batches: Iterable[pa.RecordBatch | pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of at most ``rows`` rows from a stream of batches of any size; at least one
    (maybe empty) table, so the schema is always known."""
    pending: list[pa.Table] = []
    count = 0
    schema = None
    yielded = False
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if pending and not _unifiable(pending[-1].schema, table.schema):
            # Files of one shard whose column types cannot be merged (a task's column of the
            # wrong type in one of them): separate windows, so the task judges each row.
            yielded = True
            yield _concat(pending)
            pending, count = [], 0
        schema = table.schema
        for offset in range(0, max(table.num_rows, 1), rows):
            part = table.slice(offset, rows)
            if part.num_rows == 0:
                continue
            pending.append(part)
            count += part.num_rows
            if count >= rows:
                merged = _concat(pending)
                yielded = True
                yield merged.slice(0, rows)
                rest = merged.slice(rows)
                pending, count = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if pending:
        yield _concat(pending)
    elif schema is not None and not yielded:
        yield schema.empty_table()


def _unifiable(a: pa.Schema, b: pa.Schema) -> bool:
    if a.equals(b):
        return True
    try:
        pa.unify_schemas([a, b], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return False
    return True


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Tables of one shard; files may differ slightly (int32 here, int64 there)."""
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid:
        return pa.concat_tables(tables, promote_options="permissive")


def iter_piece(fs, path: str, piece: Any, columns: list[str] | None, window_rows: int,
               where: str) -> Iterator[pa.Table]:
    """One piece of a shard (see ``pipeline.plan.Piece``) as tables of at most
    ``window_rows`` rows: memory depends on the window, not on the file or the row group."""
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as fh:
        if piece.format == "parquet":
            stream = _parquet_batches(fh, piece, columns, min(window_rows, 4096))
        elif piece.format == "ipc":
            stream = _ipc_batches(fh, piece)
        elif piece.format in ("csv", "jsonl"):
            stream = _text_batches(fs, path, fh, piece)
        elif piece.format == "images":
            stream = iter([pa.table([[piece.uri], [fh.read()]], schema=IMAGE_SCHEMA)])
        else:
            raise ValueError(f"unknown format {piece.format}")
        # View and dictionary types made plain before windows concatenate files' tables.
        plain = (plain_table(t if isinstance(t, pa.Table) else pa.Table.from_batches([t]))
                 for t in stream)
        for table in windows(plain, window_rows):
            yield _check_columns(table, columns, where)


def _parquet_batches(fh, piece: Any, columns: list[str] | None,
                     batch_rows: int) -> Iterator[pa.Table]:
    # Buffered column reads, no pre-buffering: pages stream in, so memory stays flat however
    # big the row group (1M rows of 30 floats: +127 MB, against +102 MB for 100k rows).
    pf = pq.ParquetFile(fh, buffer_size=PARQUET_BUFFER, pre_buffer=False)
    if columns is not None:
        _check_columns(pf.schema_arrow.empty_table(), columns, piece.uri)
    cols = columns
    meta = pf.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    start, end = (piece.start, piece.end) if piece.kind == "rows" else (0, sum(sizes))
    yield pf.schema_arrow.empty_table().select(cols) if cols is not None else \
        pf.schema_arrow.empty_table()
    offset = 0
    groups, first_offset = [], None
    for i, n in enumerate(sizes):
        if offset < end and offset + n > start:
            groups.append(i)
            first_offset = offset if first_offset is None else first_offset
        offset += n
    if not groups:
        return
    position = first_offset
    # Batches decode page by page: a row range inside a huge row group stays bounded.
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=cols):
        lo, hi = max(start - position, 0), min(end - position, batch.num_rows)
        if hi > lo:
            yield pa.Table.from_batches([batch.slice(lo, hi - lo)])
        position += batch.num_rows
        if position >= end:
            return


def _ipc_batches(fh, piece: Any) -> Iterator[pa.RecordBatch]:
    try:
        reader = ipc.open_file(fh)
    except pa.ArrowInvalid:
        fh.seek(0)
        stream = ipc.open_stream(fh)
        yield stream.schema.empty_table()
        yield from stream
        return
    yield reader.schema.empty_table()
    start, end = (piece.start, piece.end) if piece.kind == "batches" else \
        (0, reader.num_record_batches)
    for i in range(start, end):
        yield reader.get_batch(i)


def _text_batches(fs, path: str, fh, piece: Any) -> Iterator[pa.Table]:
    """CSV / JSON Lines. A byte range or a small file is parsed as one block, so column types
    are inferred over all of it (a streaming reader fixes them on its first block and then
    fails on a later float or a new key); the block is at most about the shard's byte target.
    Compressed files, which cannot be split, are streamed. Empty files give no rows."""
    if piece.kind == "bytes":
        # The lines that start in [start, end): fsspec's delimiter-aligned blocks give each
        # line to exactly one range. CSV ranges after the first get the header line again.
        data = read_block(fh, piece.start, piece.end - piece.start, delimiter=b"\n")
        if piece.format == "csv" and piece.start > 0:
            data = csv_header(fs, path) + data
    elif not path.endswith(".gz"):
        data = fh.read()
    else:
        if not fh.read(1):
            return
        fh.seek(0)
        reader = pacsv.open_csv(fh) if piece.format == "csv" else pajson.open_json(fh)
        yield from (pa.Table.from_batches([batch]) for batch in reader)
        return
    if not data.strip():
        return
    if piece.format == "csv":  # all columns parsed: a missing one gets our own message
        yield pacsv.read_csv(io.BytesIO(data))
    else:
        yield pajson.read_json(io.BytesIO(data))


def csv_header(fs: Any, path: str) -> bytes:
    """The first line of a CSV file, with its newline: prepended to byte-range pieces."""
    with fs.open(path, "rb") as fh:
        buffer = io.BytesIO()
        while chunk := fh.read(65536):
            end = chunk.find(b"\n")
            if end >= 0:
                buffer.write(chunk[: end + 1])
                return buffer.getvalue()
            buffer.write(chunk)
    return buffer.getvalue() + b"\n"


def read_schema(fs, path: str, fmt: str) -> pa.Schema:
    """The schema without reading the data (a footer, or the first block)."""
    if fmt == "images":
        return IMAGE_SCHEMA
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

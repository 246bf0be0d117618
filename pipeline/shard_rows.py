"""A shard's rows as a worker reads them: its pieces in order, windowed, each row tagged with
the piece it came from; for a sub-shard (``pipeline.isolation``) only its range of the root's
rows. Pieces whose row count is known without reading them (an image file is one row, a
Parquet row range its length) are skipped unread when they fall outside the range."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ShardError, classify_io_error
from pipeline.plan import Piece, Shard
from pipeline.sources import piece_tables

PIECE_COLUMN = "__pipeline_piece"  # which piece of the shard a row came from, while in flight


def known_rows(piece: Piece, row_filter: str | None = None) -> int | None:
    if row_filter or piece.read:  # a filter or a table's deletes drop rows: read to know
        return None
    if piece.format == "images":
        return 1
    if piece.kind == "rows":
        return piece.end - piece.start
    return None


def shard_tables(shard: Shard, columns: list[str] | None, storage_options: dict[str, Any],
                 window_rows: int, row_filter: str | None = None) -> Iterator[pa.Table]:
    """The shard's rows (its ``rows_range`` of them) in tables of at most ``window_rows``;
    with ``row_filter`` (``input.filter``) only the rows it keeps, ranges counted over them."""
    start, end = shard.rows_range or (0, None)
    seen = 0  # rows of the root before the current table
    for index, piece in enumerate(shard.pieces):
        if end is not None and seen >= end:
            return
        size = known_rows(piece, row_filter)
        if size is not None and shard.rows_range is not None and seen + size <= start:
            seen += size
            continue
        try:
            for table in piece_tables(piece, columns, window_rows, storage_options, row_filter):
                low, high = max(0, start - seen), table.num_rows
                if end is not None:
                    high = min(high, end - seen)
                seen += table.num_rows
                if high > low or table.num_rows == 0:  # an empty file still gives its schema
                    part = table.slice(low, max(0, high - low))
                    yield part.append_column(PIECE_COLUMN, pa.array(
                        np.full(part.num_rows, index, dtype=np.int32), pa.int32()))
                if end is not None and seen >= end:
                    return
        except ShardError:
            raise
        except Exception as exc:
            raise classify_io_error(exc, f"reading {piece.uri}") from exc


def count_rows(shard: Shard, columns: list[str] | None, storage_options: dict[str, Any],
               window_rows: int = 65536, row_filter: str | None = None) -> int:
    """The rows of the whole shard (its root), read without scoring them."""
    whole = replace(shard, rows_range=None)
    return sum(t.num_rows for t in shard_tables(whole, columns, storage_options, window_rows,
                                                row_filter))

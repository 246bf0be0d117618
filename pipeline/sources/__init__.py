"""Input sources: loose files (Parquet, Arrow IPC, CSV, JSON Lines, images) and tables (Delta,
Iceberg, Lance) behind one interface, as ``pipeline.sinks`` is for outputs.

Driver side, ``list_input(spec, version)`` gives the input's files (``sources.base.Listing``):
a folder's listing for files, one table version's data files from the table's log or
manifests for tables. A file job pointed at a table's folder is refused (``files``).
Worker side, ``read_piece`` streams one piece of a shard: files through ``pipeline.formats``,
table data files with their deletes applied and their partition values added (``tables``).

The table libraries (deltalake, lance, pyiceberg: the ``tables`` extra) load on first use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.sources.base import Listing, TableVersion
from pipeline.sources.delta import list_delta
from pipeline.sources.files import check_not_a_table, list_files
from pipeline.sources.filters import apply_filter, check_filter, filter_columns
from pipeline.sources.iceberg import list_iceberg
from pipeline.sources.lance_source import list_lance
from pipeline.sources.tables import read_piece
from pipeline.spec import InputSpec

__all__ = ["Listing", "TableVersion", "apply_filter", "check_filter", "filter_columns",
           "list_input", "read_piece", "require_library"]

LIBRARIES = {"delta": "deltalake", "lance": "lance", "iceberg": "pyiceberg"}
LISTERS = {"delta": list_delta, "lance": list_lance, "iceberg": list_iceberg}


def require_library(fmt: str | None, key: str) -> None:
    """A table format whose library is missing: exit 2 before anything runs."""
    module = LIBRARIES.get(fmt or "")
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}: {fmt} needs the {module} package, which is not installed "
                          "(pip install 'onnx-ray-pipeline[tables]')")


def list_input(spec: InputSpec, version: int | None = None) -> Listing:
    """The input's files: a table's at ``version`` (default: its current one), or a listing."""
    if spec.is_table:
        require_library(spec.format, "input.format")
        return LISTERS[str(spec.format)](spec, version)
    check_not_a_table(str(spec.uri), spec.storage_options)
    return Listing(list_files(str(spec.uri), spec.format, spec.storage_options))


def read_columns_with_filter(columns: list[str] | None, row_filter: str | None) -> list[str] | None:
    if columns is None or not row_filter:
        return columns
    return list(dict.fromkeys([*columns, *filter_columns(row_filter)]))


def filtered(tables: Iterator[pa.Table], columns: list[str] | None,
             row_filter: str | None) -> Iterator[pa.Table]:
    for table in tables:
        table = apply_filter(table, row_filter)
        yield table.select(columns) if columns is not None and row_filter else table


def piece_tables(piece: Any, columns: list[str] | None, window_rows: int,
                 storage_options: dict[str, Any], row_filter: str | None) -> Iterator[pa.Table]:
    """One piece's rows as tables of at most ``window_rows``, ``row_filter`` applied."""
    wanted = read_columns_with_filter(columns, row_filter)
    return filtered(read_piece(piece, wanted, window_rows, storage_options), columns, row_filter)

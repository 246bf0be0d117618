"""The vector index of a Lance output (``output.index``), built after a run's commit.

``IndexSpec`` (``pipeline.spec``) is the one validator of the options; here they are resolved
against the dataset's schema (which column, its dimension) and defaults are filled in:

- ``column``: a ``fixed_size_list<float>`` column; default ``embedding``, else the only
  such column.
- ``type``: IVF_PQ (default), IVF_FLAT, IVF_SQ, IVF_HNSW_SQ, IVF_HNSW_PQ, IVF_HNSW_FLAT.
- ``metric``: cosine (default), l2, dot.
- ``num_partitions``: IVF partitions; default: Lance's own choice (from its target partition
  size). Lance 14 trains fewer than asked where the rows do not fill them (PQ: about 256
  rows a partition), with a warning in its log.
- ``num_sub_vectors`` (PQ types): must divide the dimension; default the largest divisor of
  the dimension that is at most dimension / 16 (at least 1).
- ``num_bits`` (PQ types): default 8. ``name``: default ``<column>_idx``.
- ``min_rows``: rows below which no index is built; default 2**num_bits (256) for PQ types,
  ``num_partitions`` (or 1) for the others.

The index is built or replaced whenever the commit changed the data, the index is missing,
or it leaves rows unindexed. Too few rows: no index is built (an earlier one stays as it is)
and the result records ``index: {"built": False, "note": "..."}``; the run itself succeeds.
(Lance 14 itself would build an empty PQ index under 256 rows without a word.) A missing or
non-vector column or a bad ``num_sub_vectors`` raise ``OutputError`` before anything is
committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.errors import OutputError, one_line
from pipeline.spec import IndexSpec


@dataclass(frozen=True)
class IndexPlan:
    """An ``IndexSpec`` resolved against the dataset: every value known."""

    column: str
    type: str
    metric: str
    name: str
    min_rows: int
    num_partitions: int | None = None
    num_sub_vectors: int | None = None  # PQ types
    num_bits: int | None = None  # PQ types

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``LanceDataset.create_index`` beyond column, type and metric."""
        kwargs: dict[str, Any] = {k: v for k, v in (("num_partitions", self.num_partitions),
                                                     ("num_sub_vectors", self.num_sub_vectors))
                                  if v is not None}
        if self.num_bits is not None and self.num_bits != 8:
            kwargs["num_bits"] = self.num_bits
        return kwargs


def is_vector(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def index_plan(uri: str, spec: IndexSpec, schema: pa.Schema | None) -> IndexPlan:
    """``spec`` with its defaults for the output's ``schema``; OutputError when it does not
    fit the columns."""
    if schema is None:
        raise OutputError(f"output.index: {uri} has no columns to index")
    column = _column(spec, schema)
    dim = schema.field(column).type.list_size
    pq_type = "PQ" in spec.type
    sub_vectors = bits = None
    if pq_type:
        sub_vectors = spec.num_sub_vectors or _default_sub_vectors(dim)
        if dim % sub_vectors:
            raise OutputError(f"output.index.num_sub_vectors: {sub_vectors} does not divide the "
                              f"dimension of {column!r} ({dim})")
        bits = spec.num_bits or 8
    default_min = 2 ** bits if bits is not None else 1
    min_rows = spec.min_rows or max(default_min, spec.num_partitions or 1)
    return IndexPlan(column=column, type=spec.type, metric=spec.metric,
                     name=spec.name or f"{column}_idx", min_rows=min_rows,
                     num_partitions=spec.num_partitions, num_sub_vectors=sub_vectors,
                     num_bits=bits)


def _column(spec: IndexSpec, schema: pa.Schema) -> str:
    vectors = [f.name for f in schema if is_vector(f.type)]
    column = spec.column or ("embedding" if "embedding" in schema.names else
                             (vectors[0] if len(vectors) == 1 else None))
    if column is None:
        raise OutputError("output.index.column: not given, and the output has no "
                          f"'embedding' column (vector columns: {vectors or 'none'})")
    if column not in schema.names:
        raise OutputError(f"output.index.column: {column!r} is not an output column "
                          f"(columns: {', '.join(schema.names)})")
    field_type = schema.field(column).type
    if not is_vector(field_type):
        raise OutputError(f"output.index.column: {column!r} is {field_type}, a vector index "
                          "needs fixed_size_list<float>")
    return column


def _default_sub_vectors(dim: int) -> int:
    cap = max(1, dim // 16)
    return max(d for d in range(1, cap + 1) if dim % d == 0)


def build_index(uri: str, ds: Any, plan: IndexPlan, changed: bool) -> dict[str, Any]:
    """Build or replace the index where needed; what the run manifest records about it."""
    rows = ds.count_rows()
    out: dict[str, Any] = {"column": plan.column, "type": plan.type, "metric": plan.metric,
                           "name": plan.name}
    existing = _describe_index(ds, plan.name)
    if (not changed and existing is not None and existing["indexed_rows"] >= rows
            and _same_index(existing, plan)):
        out.update(built=False, note="index is up to date", indexed_rows=existing["indexed_rows"])
        return out
    if rows < plan.min_rows:
        out.update(built=False, note=(
            f"index not built: {rows} rows, {plan.type} needs at least {plan.min_rows} to "
            "train" + ("; the previous index stays (it does not cover new rows)"
                       if existing else "")))
        return out
    try:
        ds = ds.create_index(plan.column, index_type=plan.type, name=plan.name,
                             metric=plan.metric, replace=True, **plan.create_kwargs())
    except Exception as exc:  # lance raises OSError, ValueError, RuntimeError, ...
        raise OutputError(f"output.index: building {plan.type} on {plan.column!r} of {uri} "
                          f"failed (the run's rows are committed; a rerun retries the index): "
                          f"{one_line(exc, 400)}") from exc
    built = _describe_index(ds, plan.name) or {"indexed_rows": 0}
    out.update(built=True, indexed_rows=built["indexed_rows"])
    if built["indexed_rows"] < rows:
        out["note"] = f"{rows - built['indexed_rows']} of {rows} rows are not in the index"
    return out


def _describe_index(ds: Any, name: str) -> dict[str, Any] | None:
    """The index ``name`` as ``describe_indices`` tells it (cheap: no centroids), or None."""
    for index in ds.describe_indices():
        if index.name == name:
            details = index.details or {}
            return {"type": str(index.index_type).upper(),
                    "metric": str(details.get("metric_type", "")).lower(),
                    "indexed_rows": int(index.num_rows_indexed or 0)}
    return None


def _same_index(existing: dict[str, Any], plan: IndexPlan) -> bool:
    """The existing index has the type and metric asked for."""
    return existing["type"] == plan.type and existing["metric"] in ("", plan.metric)

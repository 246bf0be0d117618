"""Batch formats: Arrow tables to and from the formats Ray Data and notebooks hand out
(``pyarrow.Table``, ``pandas.DataFrame``, dicts of numpy arrays)."""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError

BatchKind = Literal["arrow", "pandas", "numpy"]


def to_arrow(batch: Any) -> tuple[pa.Table, BatchKind]:
    """An Arrow table from the batch formats Ray Data hands out, and which one it was."""
    if isinstance(batch, pa.Table):
        return batch, "arrow"
    if isinstance(batch, dict):
        return pa.table({name: _numpy_column(name, v) for name, v in batch.items()}), "numpy"
    pandas = sys.modules.get("pandas")  # never imported here: a DataFrame means it is loaded
    if pandas is not None and isinstance(batch, pandas.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False), "pandas"
    raise ConfigError(f"expected a pyarrow.Table, a pandas.DataFrame or a dict of numpy arrays, "
                      f"got {type(batch).__name__}")


def _numpy_column(name: str, values: Any) -> pa.Array:
    array = np.asarray(values)
    if array.ndim == 1:
        return pa.array(array, from_pandas=array.dtype == object)  # None and NaN become null
    if array.ndim == 2:
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    raise ConfigError(f"column {name!r} holds {array.ndim}-d arrays; use batch_format='pyarrow'")


def from_arrow(table: pa.Table, kind: BatchKind, arrow_dtypes: bool = False) -> Any:
    """``table`` in the batch format ``kind``.

    pandas: ``arrow_dtypes`` keeps every column Arrow-backed (``pd.ArrowDtype``, as Ray Data
    hands batches out), so null outputs stay null and list columns keep their type.
    numpy: fixed-size list columns become 2-D arrays; null rows of float lists hold NaN.
    """
    if kind == "arrow":
        return table
    if kind == "pandas":
        if arrow_dtypes:
            import pandas as pd

            return table.to_pandas(types_mapper=pd.ArrowDtype)
        return table.to_pandas()
    return {name: _numpy_values(table[name]) for name in table.column_names}


def _numpy_values(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    kind = array.type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type):
        out = np.full((len(array), kind.list_size), np.nan, dtype=kind.value_type.to_pandas_dtype())
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        out[valid] = array.filter(pa.array(valid)).flatten().to_numpy().reshape(-1, kind.list_size)
        return out
    return array.to_numpy(zero_copy_only=False)

"""Raw tensors: each graph input from a column, each output written as a column, types and
shapes kept.

- Inputs of any rank: a scalar column for a [N] input, list columns (nested lists or
  fixed-size lists) for [N, a, b, ...]. A row whose value has another shape than the graph
  fixes (or, for symbolic dims, than most rows of the window), or that does not convert to the
  input's type, is dead-lettered with the column and the expected shape.
- Outputs keep their dtype (int stays int, bool stays bool, strings stay strings) and their
  shape: an [N] output is a scalar column, [N, a, b] a column of nested lists, fixed-size
  where the graph fixes the dim. Nested fixed-size lists rather than Arrow's
  ``fixed_shape_tensor`` extension type: they read back the same way from Parquet, Delta (as
  lists), Lance, pandas and Spark, which do not all know the extension.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.models.onnx_types import TensorInfo, file_signature
from pipeline.tasks.base import Batch, Prepared, Task


class TensorTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        self.columns: dict[str, str] = {}
        for name, source in bundle.spec.inputs.items():
            if not source.startswith("column:"):
                raise ConfigError(f"task.kind: tensor needs column:<name> inputs, {name} is {source}")
            self.columns[name] = source.removeprefix("column:")
        graph = file_signature(bundle.model_path, bundle.sha256)
        self.inputs = {name: graph.input(name) for name in self.columns}
        self.roles = list(bundle.spec.outputs)
        self.outputs = {role: graph.output(bundle.spec.outputs[role]) for role in self.roles}

    @property
    def input_columns(self) -> list[str]:
        return list(dict.fromkeys(self.columns.values()))

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_prefix + role, self.outputs[role].arrow_type())
                          for role in self.roles])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs[r] for r in self.roles]

    def prepare(self, table: pa.Table) -> Prepared:
        bad: dict[int, str] = {}
        values = {name: table[col].to_pylist() for name, col in self.columns.items()}
        shapes = {name: self._row_shape(name, values[name], bad) for name in self.columns}
        good = np.array([i for i in range(table.num_rows) if i not in bad], dtype=np.int64)
        arrays = {name: _stack([values[name][i] for i in good], shapes[name],
                               self.inputs[name].numpy_dtype) for name in self.columns}
        step = self.batching.max_rows
        batches = [Batch(good[i:i + step], {n: a[i:i + step] for n, a in arrays.items()})
                   for i in range(0, len(good), step)]
        return Prepared(batches=batches, bad=bad)

    def _row_shape(self, name: str, values: list[Any], bad: dict[int, str]) -> tuple[int, ...]:
        """The shape every row of input ``name`` must have: the graph's fixed dims, the most
        common shape for symbolic ones. Rows that do not fit are marked bad."""
        column, info = self.columns[name], self.inputs[name]
        found: dict[int, tuple[int, ...]] = {}
        for i, value in enumerate(values):
            if value is None:
                bad.setdefault(i, f"{column} is null")
                continue
            try:
                found[i] = _array(value, info).shape
            except (TypeError, ValueError):
                bad.setdefault(i, f"{column}: value is not {_type_words(info)}")
        want = info.row_dims
        common = Counter(found.values()).most_common(1)[0][0] if found else ()
        expected = common if want is None else tuple(
            d if isinstance(d, int) and d > 0 else c for d, c in
            zip(want, common if len(common) == len(want) else (0,) * len(want), strict=True))
        for i, shape in found.items():
            if shape != expected:
                bad.setdefault(i, f"{column}: shape {list(shape)}, expected {list(expected)}")
        return expected

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        columns = {}
        for role, out in zip(self.roles, outputs, strict=True):
            field = self.output_schema.field(self.spec.output_prefix + role)
            columns[field.name] = tensor_column(np.asarray(out), field.type, len(batch))
        return columns, {}


def _array(value: Any, info: TensorInfo) -> np.ndarray:
    if info.elem_type == onnx.TensorProto.STRING:
        array = np.asarray(value, dtype=object)
        if any(not isinstance(v, str) for v in array.reshape(-1)):
            raise TypeError("not text")
        return array
    return np.asarray(value, dtype=info.numpy_dtype)


def _type_words(info: TensorInfo) -> str:
    return "text" if info.elem_type == onnx.TensorProto.STRING else f"{info.numpy_dtype.name}"


def _stack(values: list[Any], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype == np.dtype(object):
        out = np.empty((len(values), *shape), dtype=object)
        for i, v in enumerate(values):
            out[i] = np.asarray(v, dtype=object)
        return out
    return np.asarray(values, dtype=dtype).reshape(len(values), *shape)


def _depth(arrow_type: pa.DataType) -> int:
    depth = 0
    while pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type):
        arrow_type, depth = arrow_type.value_type, depth + 1
    return depth


def tensor_column(values: np.ndarray, arrow_type: pa.DataType, rows: int) -> pa.Array:
    """``values`` ([rows, *dims]) as an Arrow array of ``arrow_type`` (see ``TensorInfo``)."""
    depth = _depth(arrow_type)
    if values.ndim != depth + 1:  # the schema knows fewer dims (rank unknown): the rest flat
        values = values.reshape(rows, *values.shape[1:depth], -1) if depth else \
            values.reshape(rows)
    if depth == 0:
        if pa.types.is_string(arrow_type):
            return pa.array([v.decode() if isinstance(v, bytes) else str(v) for v in values],
                            pa.string())
        return pa.array(values, arrow_type)
    width = values.shape[1]
    child = tensor_column(values.reshape(rows * width, *values.shape[2:]),
                          arrow_type.value_type, rows * width)
    if pa.types.is_fixed_size_list(arrow_type):
        return pa.FixedSizeListArray.from_arrays(child, type=arrow_type)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, pa.int32())
    return pa.ListArray.from_arrays(offsets, child, type=arrow_type)

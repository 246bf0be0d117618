"""Raw tensors: each graph input from a column, each bundle output role written as a column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.models.onnx_types import ONNX_TO_NUMPY
from pipeline.tasks.base import Batch, Prepared, Task


class TensorTask(Task):
    def __init__(self, bundle, spec, batching, input_types):
        super().__init__(bundle, spec, batching, input_types)
        self.columns: dict[str, str] = {}
        for name, source in bundle.spec.inputs.items():
            if not source.startswith("column:"):
                raise ConfigError(f"task.kind: tensor needs column:<name> inputs, {name} is {source}")
            self.columns[name] = source.removeprefix("column:")
        self.dtypes = {n: ONNX_TO_NUMPY.get(input_types.get(n, ""), np.float32) for n in self.columns}
        self.roles = list(bundle.spec.outputs)

    @property
    def input_columns(self) -> list[str]:
        return list(dict.fromkeys(self.columns.values()))

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_prefix + r, pa.list_(pa.float32())) for r in self.roles])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs[r] for r in self.roles]

    def prepare(self, table: pa.Table) -> Prepared:
        bad: dict[int, str] = {}
        values = {name: table[col].to_pylist() for name, col in self.columns.items()}
        for name, column in self.columns.items():
            for i, v in enumerate(values[name]):
                if v is None:
                    bad.setdefault(i, f"{column} is null")
        try:
            rows, arrays = self._stack(values, bad, table.num_rows)
        except (TypeError, ValueError):
            # Ragged or non-numeric values: find those rows one by one, stack the rest.
            self._find_malformed(values, bad)
            rows, arrays = self._stack(values, bad, table.num_rows)
        step = self.batching.max_rows
        batches = [Batch(rows[i:i + step], {n: a[i:i + step] for n, a in arrays.items()})
                   for i in range(0, len(rows), step)]
        return Prepared(batches=batches, bad=bad)

    def _stack(self, values: dict[str, list], bad: dict[int, str], n: int):
        good = [i for i in range(n) if i not in bad]
        arrays = {name: np.asarray([values[name][i] for i in good], dtype=self.dtypes[name])
                  for name in self.columns}
        return np.asarray(good, dtype=np.int64), arrays

    def _find_malformed(self, values: dict[str, list], bad: dict[int, str]) -> None:
        for name, column in self.columns.items():
            shapes: dict[int, tuple] = {}
            for i, v in enumerate(values[name]):
                if i in bad:
                    continue
                try:
                    shapes[i] = np.asarray(v, dtype=self.dtypes[name]).shape
                except (TypeError, ValueError):
                    bad[i] = f"{column}: value is not numeric"
            found = list(shapes.values())
            common = max(set(found), key=found.count, default=())
            for i, shape in shapes.items():
                if shape != common:
                    bad[i] = f"{column}: shape {list(shape)}, expected {list(common)}"

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        columns = {}
        for role, out in zip(self.roles, outputs, strict=True):
            flat = np.asarray(out, dtype=np.float32).reshape(len(batch), -1)
            columns[self.spec.output_prefix + role] = pa.array(list(flat), pa.list_(pa.float32()))
        return columns, {}

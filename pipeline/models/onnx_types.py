"""ONNX tensor types: their onnxruntime names, numpy dtypes and Arrow types, and a graph's
signature (inputs and outputs with their types and shapes) read without loading weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
from onnx import helper

ONNX_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: a tensor of ``elem_type`` and ``dims``, or another kind
    (``sequence``, ``map``: what ZipMap returns)."""

    name: str
    kind: str  # tensor | sequence | map | other
    elem_type: int = 0  # onnx.TensorProto data type (tensors)
    dims: tuple[Dim, ...] | None = None  # None: rank unknown

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def type_name(self) -> str:
        """As onnxruntime words it: tensor(float), tensor(int64), ..."""
        if self.kind != "tensor":
            return self.kind
        return f"tensor({helper.tensor_dtype_to_string(self.elem_type).removeprefix('TensorProto.').lower()})"

    @property
    def row_dims(self) -> tuple[Dim, ...] | None:
        """The dims of one row: all but the batch dim."""
        return None if self.dims is None else self.dims[1:]

    def arrow_type(self) -> pa.DataType:
        """One row of this tensor as an Arrow type: a scalar for [N], nested lists for
        [N, a, b, ...] (fixed-size where the graph fixes the dim)."""
        if self.elem_type == onnx.TensorProto.STRING:
            base = pa.string()
        else:
            base = pa.from_numpy_dtype(self.numpy_dtype)
        if self.dims is None:
            return pa.list_(base)  # rank unknown: one flat list per row
        out = base
        for dim in reversed(self.dims[1:]):
            out = pa.list_(out, dim) if isinstance(dim, int) and dim > 0 else pa.list_(out)
        return out


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    kind = value.type.WhichOneof("value")
    if kind == "tensor_type":
        t = value.type.tensor_type
        dims = None
        if t.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else
                         (d.dim_param or None) for d in t.shape.dim)
        return TensorInfo(value.name, "tensor", t.elem_type, dims)
    names = {"sequence_type": "sequence", "map_type": "map"}
    return TensorInfo(value.name, names.get(kind, "other"))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        return next(i for i in self.inputs if i.name == name)

    def output(self, name: str) -> TensorInfo:
        return next(o for o in self.outputs if o.name == name)


def signature(model: onnx.ModelProto) -> Signature:
    """Graph inputs (initializers excluded) and outputs, output shapes completed by onnx's
    shape inference where the graph leaves them out."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(_info(v) for v in model.graph.input if v.name not in initializers)
    outputs = {v.name: _info(v) for v in model.graph.output}
    if any(o.kind == "tensor" and (o.dims is None or None in o.dims) for o in outputs.values()):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for v in inferred.graph.output:
                better = _info(v)
                if better.dims is not None and (outputs[v.name].dims is None
                                                or len(better.dims) == len(outputs[v.name].dims)):
                    outputs[v.name] = _merge(outputs[v.name], better)
        except Exception:  # an op shape inference does not know: keep what the graph says
            pass
    return Signature(inputs, tuple(outputs.values()))


def _merge(declared: TensorInfo, inferred: TensorInfo) -> TensorInfo:
    if declared.dims is None:
        return inferred
    dims = tuple(d if d is not None else i for d, i in zip(declared.dims, inferred.dims,
                                                             strict=True))
    return TensorInfo(declared.name, declared.kind, declared.elem_type or inferred.elem_type, dims)


@functools.lru_cache(maxsize=32)
def _file_signature(path: str, sha256: str) -> Signature:
    return signature(onnx.load(path, load_external_data=False))


def file_signature(path: str | Path, sha256: str = "") -> Signature:
    """The signature of the model file at ``path`` (cached per file and hash)."""
    return _file_signature(str(path), sha256)

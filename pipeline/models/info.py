"""Describe a bundle: what the graph takes and returns, and where it came from."""

from __future__ import annotations

from typing import Any

import onnx

from pipeline.models.bundle import fetch_bundle
from pipeline.models.validate import check_model_file


def _dims(value: onnx.ValueInfoProto) -> list[Any]:
    shape = value.type.tensor_type.shape
    return [d.dim_param if d.HasField("dim_param")
            else (d.dim_value if d.HasField("dim_value") else None) for d in shape.dim]


def _type(value: onnx.ValueInfoProto) -> str:
    return onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()


def bundle_info(uri: str) -> dict[str, Any]:
    bundle = fetch_bundle(uri)
    model = check_model_file(str(bundle.model_path), f"{uri}/{bundle.spec.model_file}")
    initializers = {i.name for i in model.graph.initializer}
    roles = {name: role for role, name in bundle.spec.outputs.items()}
    return {
        "uri": uri,
        "task": bundle.spec.task,
        "sha256": bundle.sha256,
        "identity": bundle.identity,
        "size_bytes": bundle.model_path.stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": [
            {"name": i.name, "type": _type(i), "shape": _dims(i),
             "source": bundle.spec.inputs.get(i.name)}
            for i in model.graph.input if i.name not in initializers
        ],
        "outputs": [
            {"name": o.name, "type": _type(o), "shape": _dims(o), "role": roles.get(o.name)}
            for o in model.graph.output
        ],
        "text": bundle.spec.text.model_dump() if bundle.spec.text else None,
        "features": bundle.spec.features,
        "labels": bundle.spec.labels,
        "source": bundle.spec.source,
    }

"""Graph rewrites for ``optimize``: export-bert graphs in the op order onnxruntime's fusion
patterns expect, and SmoothQuant channel scaling before int8 quantization.

Both keep the model's outputs (up to float rounding); the optimize gate checks that they do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

QUANTIZED_OPS = ("MatMul", "Attention")
GELU_OPS = ("Gelu", "BiasGelu", "FastGelu")
SMOOTH_ALPHA = 0.75  # 0.5 lost accuracy (the weights took the outliers), 0.9 too; see the report


# --- export-bert graphs in the op order onnxruntime's fusion patterns match -----------------

def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _const(model: onnx.ModelProto, name: str, value: Any, dtype: Any) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def _insert_before(model: onnx.ModelProto, anchor: onnx.NodeProto,
                   nodes: list[onnx.NodeProto]) -> None:
    index = list(model.graph.node).index(anchor)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(index + offset, node)


def _mask_as_hf(model: onnx.ModelProto) -> bool:
    """Sub(1, Unsqueeze(Cast(mask), [1, 2])) -> Sub(1, Cast(Unsqueeze(Unsqueeze(mask))))."""
    made = _producers(model)
    for sub in [n for n in model.graph.node if n.op_type == "Sub"]:
        unsq = made.get(sub.input[1])
        cast = made.get(unsq.input[0]) if unsq is not None and unsq.op_type == "Unsqueeze" else None
        if cast is None or cast.op_type != "Cast":
            continue
        one, two = (_const(model, f"canon_axis_{a}", [a], np.int64) for a in (1, 2))
        nodes = [helper.make_node("Unsqueeze", [cast.input[0], one], ["canon_mask_1"]),
                 helper.make_node("Unsqueeze", ["canon_mask_1", two], ["canon_mask_2"]),
                 helper.make_node("Cast", ["canon_mask_2"], ["canon_mask"], to=onnx.TensorProto.FLOAT)]
        _insert_before(model, sub, nodes)
        sub.input[1] = "canon_mask"
        return True
    return False


def _positions_as_hf(model: onnx.ModelProto) -> bool:
    """Gather(table, Range(0, seq_len, 1)) -> Gather(table, Slice(position_ids, 0, seq_len))."""
    made = _producers(model)
    sizes = {i.name: list(i.dims) for i in model.graph.initializer}
    for gather in [n for n in model.graph.node if n.op_type == "Gather"]:
        rng = made.get(gather.input[1])
        if rng is None or rng.op_type != "Range" or gather.input[0] not in sizes:
            continue
        squeeze = made.get(rng.input[1])  # Range(0, Squeeze(Shape(input_ids)[1:2]), 1)
        shape = made.get(squeeze.input[0]) if squeeze is not None else None
        if shape is None or shape.op_type != "Shape":
            return False
        ids = _const(model, "position_ids", np.arange(sizes[gather.input[0]][0])[None], np.int64)
        zero, one = _const(model, "canon_0", [0], np.int64), _const(model, "canon_1", [1], np.int64)
        index = _const(model, "canon_index_1", 1, np.int64)
        nodes = [helper.make_node("Shape", [shape.input[0]], ["canon_shape"]),
                 helper.make_node("Gather", ["canon_shape", index], ["canon_seq"], axis=0),
                 helper.make_node("Unsqueeze", ["canon_seq", zero], ["canon_end"]),
                 helper.make_node("Slice", [ids, zero, "canon_end", one, one], ["canon_positions"])]
        _insert_before(model, gather, nodes)
        gather.input[1] = "canon_positions"
        return True
    return False


def _scale_as_div(model: onnx.ModelProto) -> int:
    """Mul(MatMul(q, k), c) -> Div(MatMul(q, k), 1/c): the pattern matcher cannot tell a Mul
    scale from the Mul of the mask when both feed the same Add."""
    made = _producers(model)
    consts = {i.name: i for i in model.graph.initializer}
    count = 0
    for node in [n for n in model.graph.node if n.op_type == "Mul"]:
        scale, parent = consts.get(node.input[1]), made.get(node.input[0])
        if scale is None or scale.dims or parent is None or parent.op_type != "MatMul":
            continue
        inverse = 1.0 / float(numpy_helper.to_array(scale))
        node.op_type = "Div"
        node.input[1] = _const(model, f"{node.name}_inverse", inverse, np.float32)
        count += 1
    return count


def _tanh_gelu_half_first(model: onnx.ModelProto) -> int:
    """(x * (1 + tanh(..))) * 0.5 -> ((1 + tanh(..)) * 0.5) * x, the order of the FastGelu
    pattern; halving is exact in float, so the output is bit for bit the same."""
    made = _producers(model)
    consts = {i.name for i in model.graph.initializer}
    count = 0
    for outer in [n for n in model.graph.node if n.op_type == "Mul" and n.input[1] in consts]:
        inner = made.get(outer.input[0])
        one_plus = made.get(inner.input[1]) if inner is not None and inner.op_type == "Mul" else None
        tanh = made.get(one_plus.input[0]) if one_plus is not None and one_plus.op_type == "Add" else None
        if tanh is None or tanh.op_type != "Tanh":
            continue
        x, half = inner.input[0], outer.input[1]
        inner.input[0], inner.input[1] = one_plus.output[0], half
        outer.input[1] = x
        count += 1
    return count


def canonical_bert(model: onnx.ModelProto) -> list[str]:
    """Rewrite an export-bert graph in place; returns what changed (same outputs up to rounding)."""
    done = []
    if _mask_as_hf(model):
        done.append("mask")
    if _positions_as_hf(model):
        done.append("positions")
    if _scale_as_div(model):
        done.append("attention scale")
    if _tanh_gelu_half_first(model):
        done.append("tanh gelu")
    return done


# --- SmoothQuant -----------------------------------------------------------------------------

def weighted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    consts = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in consts]


def first_ffn_output(model: onnx.ModelProto) -> list[str]:
    """The first MatMul fed by a GELU: measured the single most sensitive node to quantize."""
    made = _producers(model)
    for node in weighted_nodes(model):
        parent = made.get(node.input[0])
        if node.op_type == "MatMul" and parent is not None and parent.op_type in GELU_OPS:
            return [node.name]
    return []


def activation_maxima(model: onnx.ModelProto, names: list[str],
                      feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the tensors ``names`` over the calibration batches."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            flat = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, flat), flat)
    return maxima


def smooth(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
           maxima: dict[str, np.ndarray], alpha: float = SMOOTH_ALPHA) -> None:
    """SmoothQuant: x @ W == (x / s) @ (s W), with s chosen so that neither side's channels
    dwarf the others; a per-tensor int8 range then fits the activations far better."""
    consts = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    added = []
    for node in nodes:
        if uses[node.input[1]] > 1:  # a shared weight would be scaled once per user
            continue
        weight = numpy_helper.to_array(consts[node.input[1]])
        act = np.maximum(maxima[node.input[0]], 1e-5)
        rows = np.maximum(np.abs(weight).max(axis=1), 1e-5)
        s = np.clip(act ** alpha / rows ** (1 - alpha), 1e-2, 1e2).astype(np.float32)
        consts[node.input[1]].CopyFrom(numpy_helper.from_array(weight * s[:, None], node.input[1]))
        inverse = _const(model, f"{node.name}_smooth", 1.0 / s, np.float32)
        added.append((node, helper.make_node("Mul", [node.input[0], inverse],
                                             [f"{node.name}_smoothed"])))
    for node, mul in added:
        _insert_before(model, node, [mul])
        node.input[0] = mul.output[0]

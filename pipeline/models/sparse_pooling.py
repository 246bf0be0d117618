"""SPLADE pooling fused into the graph at import, so that a worker never holds the
``[batch, tokens, vocab]`` MLM logits as arrays of its own (64 rows of 128 tokens over
BERT's 30,522 words would be 1 GB of float32 per batch).

sentence-transformers' ``SpladePooling``: logits times the attention mask, ``relu``, ``log1p``
(twice for ``log1p_relu``), then the max (or sum) over tokens. The same nodes appended to the
graph give a ``sparse_embedding`` output of ``[batch, vocab]`` in place of the logits.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.errors import ModelError

SPARSE_OUTPUT = "sparse_embedding"


def fuse_splade_pooling(model: onnx.ModelProto, logits: str, mask: str, pooling: str,
                        activation: str, where: str) -> str:
    """Append the pooling after ``logits`` (fed ``mask``); what was done, in words."""
    outputs = [o.name for o in model.graph.output]
    if logits not in outputs:
        raise ModelError(f"{where}: no output {logits} to pool")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ModelError(f"{where}: opset {opset}; SPLADE pooling needs 11 or newer")
    prefix = "splade_pooling"
    one = f"{prefix}/one"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    axes_last = f"{prefix}/axes_last"
    axes_tokens = f"{prefix}/axes_tokens"
    nodes = [helper.make_node("Cast", [mask], [f"{prefix}/mask_f"], to=onnx.TensorProto.FLOAT)]
    if opset >= 13:  # Unsqueeze takes its axes as an input from opset 13
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64),
                                                               axes_last))
        nodes.append(helper.make_node("Unsqueeze", [f"{prefix}/mask_f", axes_last],
                                      [f"{prefix}/mask_3d"]))
    else:
        nodes.append(helper.make_node("Unsqueeze", [f"{prefix}/mask_f"], [f"{prefix}/mask_3d"],
                                      axes=[-1]))
    nodes += [helper.make_node("Mul", [logits, f"{prefix}/mask_3d"], [f"{prefix}/masked"]),
              helper.make_node("Relu", [f"{prefix}/masked"], [f"{prefix}/relu"]),
              helper.make_node("Add", [f"{prefix}/relu", one], [f"{prefix}/plus_one"]),
              helper.make_node("Log", [f"{prefix}/plus_one"], [f"{prefix}/log1p"])]
    last = f"{prefix}/log1p"
    if activation == "log1p_relu":
        nodes += [helper.make_node("Add", [last, one], [f"{prefix}/plus_one_2"]),
                  helper.make_node("Log", [f"{prefix}/plus_one_2"], [f"{prefix}/log1p_2"])]
        last = f"{prefix}/log1p_2"
    reduce = "ReduceMax" if pooling == "max" else "ReduceSum"
    # ReduceSum takes its axes as an input from opset 13, ReduceMax from opset 18.
    if (reduce == "ReduceSum" and opset >= 13) or opset >= 18:
        model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64),
                                                               axes_tokens))
        nodes.append(helper.make_node(reduce, [last, axes_tokens], [SPARSE_OUTPUT], keepdims=0))
    else:
        nodes.append(helper.make_node(reduce, [last], [SPARSE_OUTPUT], axes=[1], keepdims=0))
    model.graph.node.extend(nodes)
    _replace_output(model, logits)
    twice = " twice" if activation == "log1p_relu" else ""
    return (f"SpladePooling fused into the graph: {logits} [batch, tokens, vocab] -> "
            f"{SPARSE_OUTPUT} [batch, vocab], the {pooling} over unmasked tokens of "
            f"log1p{twice}(relu(logits)); the logits never leave onnxruntime")


def _replace_output(model: onnx.ModelProto, logits: str) -> None:
    """``sparse_embedding [batch, vocab]`` where the graph output ``logits`` was."""
    info = next(o for o in model.graph.output if o.name == logits)
    dims = list(info.type.tensor_type.shape.dim)
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
             for d in (dims[0], dims[-1])] if len(dims) == 3 else ["batch", None]
    index = [o.name for o in model.graph.output].index(logits)
    model.graph.output.remove(info)
    model.graph.output.insert(index, helper.make_tensor_value_info(
        SPARSE_OUTPUT, onnx.TensorProto.FLOAT, shape))

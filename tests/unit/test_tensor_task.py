"""The tensor task keeps types and shapes: several inputs of any rank, outputs as int, bool,
string and nested fixed-size lists, and rows of the wrong shape dead-lettered by name."""

from __future__ import annotations

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper

from pipeline.inference import score_table
from pipeline.models.bundle import BundleSpec, LocalBundle, write_bundle_spec
from pipeline.models.onnx_graph import IR_VERSION, OPSET
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BatchingSpec, TensorTaskSpec
from pipeline.storage import sha256_file
from pipeline.tasks import build_task


def multi_io_bundle(tmp_path) -> LocalBundle:
    """x [N,2,3] float and name [N] string in; twice x, its sum, its argmax (int64), whether
    the sum is positive (bool) and the name out."""
    nodes = [
        helper.make_node("Add", ["x", "x"], ["twice"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("ArgMax", ["flat"], ["argmax"], axis=1, keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("Identity", ["name"], ["name_out"]),
    ]
    init = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, 6]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    graph = helper.make_graph(
        nodes, "multi",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3]),
         helper.make_tensor_value_info("name", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["batch", 2, 3]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("argmax", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["batch"]),
         helper.make_tensor_value_info("name_out", TensorProto.STRING, ["batch"])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    spec = BundleSpec(task="tensor", sha256=sha256_file(str(tmp_path / "model.onnx")),
                      inputs={"x": "column:x", "name": "column:name"},
                      outputs={o: o for o in ("twice", "total", "argmax", "positive", "name_out")})
    write_bundle_spec(tmp_path, spec)
    return LocalBundle(tmp_path, spec, str(tmp_path))


def test_outputs_keep_their_types_and_shapes(tmp_path):
    bundle = multi_io_bundle(tmp_path)
    session = create_session(str(bundle.model_path), SessionSettings())
    task = build_task(bundle, TensorTaskSpec(kind="tensor"), BatchingSpec(max_rows=2), {})
    schema = task.output_schema
    assert schema.field("twice").type == pa.list_(pa.list_(pa.float32(), 3), 2)
    assert [schema.field(n).type for n in ("total", "argmax", "positive", "name_out")] == \
        [pa.float32(), pa.int64(), pa.bool_(), pa.string()]

    x = [[[1, 2, 3], [4, 5, 6]], [[-1, -1, -1], [0, 0, -9]], [[1, 1], [1, 1]],
         [[0, 9, 0], [0, 0, 0]], None]
    table = pa.table({"x": pa.array(x, pa.list_(pa.list_(pa.float64()))),
                      "name": ["a", "b", "c", "d", "e"]})
    scored = score_table(task, session, table)
    assert scored.bad == {2: "x: shape [2, 2], expected [2, 3]", 4: "x is null"}
    assert scored.rows.tolist() == [0, 1, 3]
    out = scored.columns.to_pydict()
    assert out["twice"][0] == [[2.0, 4.0, 6.0], [8.0, 10.0, 12.0]]
    assert out["total"] == [21.0, -12.0, 9.0]
    assert out["argmax"] == [5, 3, 1] and out["positive"] == [True, False, True]
    assert out["name_out"] == ["a", "b", "d"]
    path = tmp_path / "part.parquet"  # the types survive a Parquet round trip
    pq.write_table(scored.columns, path)
    assert pq.read_table(path).schema.equals(schema)


def test_fixed_size_list_inputs_feed_the_same(tmp_path):
    bundle = multi_io_bundle(tmp_path)
    session = create_session(str(bundle.model_path), SessionSettings())
    task = build_task(bundle, TensorTaskSpec(kind="tensor", output_prefix="y_"),
                      BatchingSpec(), {})
    flat = pa.array(np.arange(12, dtype=np.float32))
    x = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, 3), 2)
    scored = score_table(task, session, pa.table({"x": x, "name": ["p", "q"]}))
    assert scored.bad == {} and scored.columns.column_names[0] == "y_twice"
    assert scored.columns["y_total"].to_pylist() == [15.0, 51.0]


def test_values_of_the_wrong_type_are_dead_lettered_by_column(tmp_path):
    bundle = multi_io_bundle(tmp_path)
    session = create_session(str(bundle.model_path), SessionSettings())
    task = build_task(bundle, TensorTaskSpec(kind="tensor"), BatchingSpec(), {})
    x = pa.array([[["1", "2", "3"], ["4", "5", "6"]], [["a", "1", "1"], ["1", "1", "1"]]])
    scored = score_table(task, session, pa.table({"x": x, "name": pa.array([1, 2])}))
    assert scored.bad == {0: "name: value is not text", 1: "x: value is not float32"}

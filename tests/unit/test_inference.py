"""Isolating bad rows: a failing batch is split until the rows that break the model are found."""

from __future__ import annotations

import numpy as np
import onnx
import pyarrow as pa
import pytest
from onnx import TensorProto, helper

from pipeline.errors import ShardError
from pipeline.inference import score_table
from pipeline.models.bundle import BundleSpec, LocalBundle, write_bundle_spec
from pipeline.models.onnx_graph import IR_VERSION, OPSET
from pipeline.sessions import LoadedSession, SessionSettings, create_session
from pipeline.spec import BatchingSpec, TensorTaskSpec
from pipeline.storage import sha256_file
from pipeline.tasks import build_task


@pytest.fixture()
def lookup_bundle(tmp_path) -> LocalBundle:
    """out = table[x]: a model that fails (index out of range) for x >= 10."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10], [float(i) * 10 for i in range(10)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "x"], ["out"], axis=0)], "lookup",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch"])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    spec = BundleSpec(task="tensor", sha256=sha256_file(str(tmp_path / "model.onnx")),
                      inputs={"x": "column:x"}, outputs={"value": "out"})
    write_bundle_spec(tmp_path, spec)
    return LocalBundle(tmp_path, spec, str(tmp_path))


def lookup_task(bundle: LocalBundle, max_rows: int = 64):
    session = create_session(str(bundle.model_path), SessionSettings())
    task = build_task(bundle, TensorTaskSpec(kind="tensor"), BatchingSpec(max_rows=max_rows),
                      {"x": "tensor(int64)"})
    return task, session


def test_rows_that_break_the_model_are_isolated(lookup_bundle):
    task, session = lookup_task(lookup_bundle)
    x = [1, 2, 99, 3, None, 4, 5, 42, 6]
    scored = score_table(task, session, pa.table({"x": pa.array(x, pa.int64())}))
    assert sorted(scored.bad) == [2, 4, 7]
    assert scored.bad[4] == "x is null"
    assert scored.bad[2].startswith("model failed:")
    assert scored.rows.tolist() == [0, 1, 3, 5, 6, 8]
    values = scored.columns["value"].to_pylist()  # an [N] output: one scalar per row
    assert values == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert scored.batches > 1  # the batch was split


def test_model_failing_on_every_row_is_a_shard_error(lookup_bundle):
    task, session = lookup_task(lookup_bundle)
    with pytest.raises(ShardError, match="fails on every row"):
        score_table(task, session, pa.table({"x": pa.array([50] * 40, pa.int64())}))


class _OomSession:
    """Fails like onnxruntime does when a batch is too large for the device."""

    def __init__(self, real, max_rows: int) -> None:
        self.real = real
        self.max_rows = max_rows
        self.sizes: list[int] = []

    def run(self, names, feeds):
        n = len(next(iter(feeds.values())))
        self.sizes.append(n)
        if n > self.max_rows:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")
        return self.real.run(names, feeds)


def test_out_of_memory_batch_is_retried_smaller(lookup_bundle):
    task, session = lookup_task(lookup_bundle, max_rows=32)
    fake = _OomSession(session.session, max_rows=8)
    loaded = LoadedSession(session=fake, requested=("cpu",), active="cpu")
    x = np.arange(64) % 10
    scored = score_table(task, loaded, pa.table({"x": pa.array(x, pa.int64())}))
    assert not scored.bad
    assert scored.rows.tolist() == list(range(64))
    assert scored.oom_splits >= 2
    assert max(s for s in fake.sizes if s <= 8) == 8
    assert scored.columns["value"].to_pylist() == [float(i) * 10 for i in x]


def test_out_of_memory_on_a_single_row_is_transient_not_a_dead_letter(lookup_bundle):
    from pipeline.errors import TransientError

    task, session = lookup_task(lookup_bundle, max_rows=4)
    fake = _OomSession(session.session, max_rows=0)
    loaded = LoadedSession(session=fake, requested=("cpu",), active="cpu")
    with pytest.raises(TransientError, match="out of memory on a single row"):
        score_table(task, loaded, pa.table({"x": pa.array([1, 2, 3], pa.int64())}))

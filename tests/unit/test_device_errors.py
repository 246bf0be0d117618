"""Device and session failures are not data errors: DeviceError, never dead letters.

Real onnxruntime sessions of the breast_cancer bundle, wrapped by small fault-injecting
sessions (no mocks of onnxruntime internals).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from pipeline.demo.tabular import make_scoring_table
from pipeline.errors import (
    DEVICE_ERROR_PREFIX,
    DeviceError,
    ShardError,
    TransientError,
)
from pipeline.faults import FailingSession, maybe_inject, take_session_fault
from pipeline.inference import classify_run_error, score_table
from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import LoadedSession, SessionSettings, create_session
from pipeline.spec import BatchingSpec, ClassifyTaskSpec
from pipeline.tasks import build_task

POISON = 12345.0  # a mean_radius value the poisoned session refuses, as a model might a row
ROW_ERROR = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while "
             "running Gemm node. Name:'gemm' Status Message: value out of range")
UNMARKED_ERROR = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                  "while running Gemm node. Name:'gemm' Status Message: unknown error")
CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def bundle(breast_cancer_dir):
    return fetch_bundle(str(breast_cancer_dir))


def classifier(bundle, max_rows: int = 8):
    """A fresh session (probe and broken state live on it) and the classify task."""
    session = create_session(str(bundle.model_path), SessionSettings())
    types = {i.name: i.type for i in session.session.get_inputs()}
    task = build_task(bundle, ClassifyTaskSpec(kind="classify"), BatchingSpec(max_rows=max_rows),
                      types)
    return task, session


def wrapped(session: LoadedSession, fake, active: str | None = None) -> LoadedSession:
    return LoadedSession(session=fake, requested=(active or session.active,),
                         active=active or session.active)


def poisoned_table(rows: int, poison_at: list[int]) -> pa.Table:
    table = make_scoring_table(rows, seed=3)
    radius = table["mean_radius"].to_numpy().copy()
    radius[poison_at] = POISON
    return table.set_column(table.schema.get_field_index("mean_radius"), "mean_radius",
                            pa.array(radius))


class PoisonedSession:
    """Fails any batch holding a poisoned row, like a model refusing an input value. With
    ``breaks``, the first such failure leaves the session failing every run afterwards, with
    an error that names no device: only the probe can tell it from bad data."""

    def __init__(self, real, breaks: bool = False) -> None:
        self.real = real
        self.breaks = breaks
        self.broken = False
        self.runs = 0

    def run(self, names, feeds):
        self.runs += 1
        if self.broken:
            raise RuntimeError(UNMARKED_ERROR)
        if np.any(feeds["features"][:, 0] == POISON):
            self.broken = self.breaks
            raise RuntimeError(ROW_ERROR)
        return self.real.run(names, feeds)

    def get_providers(self):
        return self.real.get_providers()


class SwitchingSession:
    """Runs on "CUDA" until run number ``switch_at``, where the provider drops to CPU, with an
    error (``fail=True``) or silently."""

    def __init__(self, real, switch_at: int, fail: bool) -> None:
        self.real = real
        self.switch_at = switch_at
        self.fail = fail
        self.runs = 0

    def run(self, names, feeds):
        self.runs += 1
        if self.runs == self.switch_at and self.fail:
            raise RuntimeError(UNMARKED_ERROR)
        return self.real.run(names, feeds)

    def get_providers(self):
        return ["CPUExecutionProvider"] if self.runs >= self.switch_at else CUDA_PROVIDERS


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("message, kind", [
    ("CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; hostname=h", "device"),
    ("CUDA error cudaErrorLaunchFailure:unspecified launch failure", "device"),
    ("CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; GPU=0", "device"),
    ("CUBLAS failure 13: CUBLAS_STATUS_EXECUTION_FAILED", "device"),
    ("device-side assert triggered", "device"),
    ("TensorRT EP execution context enqueue failed.", "device"),
    ("[ONNXRuntimeError] : 11 : EP_FAIL : the CUDA execution provider failed", "device"),
    ("CUDA failure 2: out of memory ; GPU=0", "oom"),
    ("CUDA error cudaErrorMemoryAllocation:out of memory", "oom"),
    ("CUDNN failure 2: CUDNN_STATUS_ALLOC_FAILED", "oom"),
    ("Failed to allocate memory for requested buffer of size 1073741824", "oom"),
    (ROW_ERROR, "row"),
    ("Gather node. Name:'g' Status Message: indices element out of data bounds, idx=99 must be "
     "within the inclusive range [-10,9]", "row"),
])
def test_run_errors_are_classified(message, kind):
    assert classify_run_error(RuntimeError(message)) == kind


def test_a_real_shape_error_is_a_row_error(bundle):
    _, session = classifier(bundle)
    with pytest.raises(Exception) as info:
        session.session.run(None, {"features": np.zeros((1, 29), np.float32)})
    assert classify_run_error(info.value) == "row"


def test_device_error_pickles_and_is_transient():
    err = DeviceError("device error on cuda: CUDA failure 700", "cuda", "cpu", shard_id="s1")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DeviceError and isinstance(back, TransientError)
    assert (back.message, back.provider, back.provider_after, back.transient, back.shard_id) == \
        (err.message, "cuda", "cpu", True, "s1")
    assert str(back).startswith(DEVICE_ERROR_PREFIX)


# --------------------------------------------------------------------------- device errors


def test_cuda_error_on_every_run_is_a_device_error_not_dead_letters(bundle):
    task, session = classifier(bundle)
    fake = FailingSession(session.session)
    loaded = wrapped(session, fake)
    with pytest.raises(DeviceError, match="illegal memory access") as info:
        score_table(task, loaded, make_scoring_table(64))
    assert str(info.value).startswith("device error on cpu: Gemm node: CUDA failure 700")
    assert info.value.provider == "cpu"
    assert fake.runs == 1  # no splitting down to rows that would be dead-lettered
    assert loaded.broken == str(info.value)
    # The broken session is not run again: the next shard fails at once, also as a DeviceError.
    with pytest.raises(DeviceError, match="broke on an earlier shard"):
        score_table(task, loaded, make_scoring_table(8))
    assert fake.runs == 1


def test_one_bad_row_on_a_healthy_session_is_dead_lettered(bundle):
    task, session = classifier(bundle, max_rows=8)
    fake = PoisonedSession(session.session)
    loaded = wrapped(session, fake)
    table = poisoned_table(40, [13])
    scored = score_table(task, loaded, table)
    assert list(scored.bad) == [13]
    assert scored.bad[13].startswith("model failed: ") and "value out of range" in scored.bad[13]
    assert scored.rows.tolist() == [i for i in range(40) if i != 13]
    assert scored.probes == 1  # one probe, for the one row that failed alone
    assert scored.provider_after == "cpu" and loaded.broken is None
    plain = score_table(task, session, table.filter(pa.array([i != 13 for i in range(40)])))
    assert scored.columns.equals(plain.columns)


def test_first_rows_on_a_new_session_have_no_probe_yet(bundle):
    # Row 0 fails before anything ran on the session: nothing to probe with. It stands because
    # the shard's later batches run (a broken session would fail them and the shard).
    task, session = classifier(bundle, max_rows=8)
    loaded = wrapped(session, PoisonedSession(session.session))
    scored = score_table(task, loaded, poisoned_table(20, [0]))
    assert list(scored.bad) == [0] and scored.probes == 0
    assert len(scored.rows) == 19


def test_row_failure_then_failed_probe_is_a_device_error(bundle):
    task, session = classifier(bundle, max_rows=8)
    fake = PoisonedSession(session.session, breaks=True)
    loaded = wrapped(session, fake)
    with pytest.raises(DeviceError, match="fails a row it ran before") as info:
        score_table(task, loaded, poisoned_table(40, [13]))
    # The batch holding row 13 broke the session: row 8, the first row run alone, fails too.
    assert "after row 8 failed alone (Gemm node: unknown error)" in str(info.value)
    assert loaded.broken


def test_probe_from_an_earlier_shard_catches_a_session_that_broke_between_shards(bundle):
    task, session = classifier(bundle, max_rows=8)
    fake = PoisonedSession(session.session)
    loaded = wrapped(session, fake)
    score_table(task, loaded, make_scoring_table(16))  # records the probe
    assert loaded.probe_feeds is not None and loaded.probe_feeds["features"].shape == (1, 30)
    fake.broken = True  # every run fails now, with an error that names no device
    fake.runs = 0
    with pytest.raises(DeviceError, match="fails a row it ran before"):
        score_table(task, loaded, make_scoring_table(64))
    # Split down to one row, then the probe: not 16 dead rows and a "fails on every row".
    assert fake.runs <= 6


def test_model_failing_on_every_row_of_a_healthy_session_stays_a_shard_error(bundle):
    task, session = classifier(bundle, max_rows=8)
    loaded = wrapped(session, PoisonedSession(session.session))
    score_table(task, loaded, make_scoring_table(8))  # a probe exists, and it keeps passing
    with pytest.raises(ShardError, match="fails on every row") as info:
        score_table(task, loaded, poisoned_table(32, list(range(32))))
    assert not isinstance(info.value, DeviceError) and loaded.broken is None


# --------------------------------------------------------------------------- provider switch


def test_provider_switch_after_an_error_is_a_device_error(bundle):
    task, session = classifier(bundle, max_rows=8)
    fake = SwitchingSession(session.session, switch_at=3, fail=True)
    loaded = wrapped(session, fake, active="cuda")
    with pytest.raises(DeviceError, match="switched from cuda to cpu mid-job") as info:
        score_table(task, loaded, make_scoring_table(40))
    assert (info.value.provider, info.value.provider_after) == ("cuda", "cpu")
    assert loaded.fallback_mid_job.startswith("cuda stopped running the session mid-job; cpu")
    assert "unknown error" in loaded.fallback_mid_job
    assert fake.runs == 3  # found at the first error, not after splitting


def test_silent_provider_switch_is_a_device_error(bundle):
    task, session = classifier(bundle, max_rows=8)
    loaded = wrapped(session, SwitchingSession(session.session, switch_at=2, fail=False),
                     active="cuda")
    with pytest.raises(DeviceError, match="switched from cuda to cpu") as info:
        score_table(task, loaded, make_scoring_table(40))
    assert info.value.provider_after == "cpu"
    assert loaded.fallback_mid_job == "cuda stopped running the session mid-job; cpu runs it now"


# --------------------------------------------------------------------------- fault injection


def test_injected_device_fault_fails_one_shard(bundle, monkeypatch):
    rule = {"point": "worker.infer", "action": "device", "shard": "abc", "attempt": 1}
    monkeypatch.setenv("PIPELINE_FAULTS", json.dumps([rule]))
    task, session = classifier(bundle, max_rows=8)
    table = make_scoring_table(24)
    maybe_inject("worker.infer", "xyz", 1)  # another shard: nothing armed
    assert score_table(task, session, table).rows.tolist() == list(range(24))
    maybe_inject("worker.infer", "abc123", 2)  # another attempt: nothing armed
    assert take_session_fault() is None
    maybe_inject("worker.infer", "abc123", 1)
    with pytest.raises(DeviceError, match="CUDA failure 700: an illegal memory access"):
        score_table(task, session, table)
    assert take_session_fault() is None  # taken by that shard only
    assert session.broken  # the real session is distrusted from now on, like a sticky error

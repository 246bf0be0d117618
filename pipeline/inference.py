"""Run a task's batches through a session, isolating rows that break the model.

A failing batch is split in halves until the failing rows are found: they go to the
dead-letter list, the rest of the batch is still scored. A batch that fails for lack of
memory is retried in halves too. A model that fails on every row is a shard error,
not a pile of dead letters.

A failure of the session or its device is never the rows' fault. An error that names CUDA,
cuDNN, cuBLAS, TensorRT or an execution provider, a provider that stopped running the session,
or a session that fails a known-good input raises ``DeviceError`` at once (no splitting, no
dead letters) and marks the session broken: the shard is retried by another worker, and this
session is not run again. The known-good input (the probe) is one row that already ran on this
session; it runs only after a single row failed, so a row is dead-lettered only when the session
ran the probe right after it. Before anything has run on a session there is no probe: those
rows stand only if the shard commits, and a later device error, probe failure or provider switch
in the shard still fails the whole shard (sticky device errors do not heal).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.errors import (
    DEVICE_ERROR_PREFIX,
    DeviceError,
    OutOfMemory,
    ShardError,
    one_line,
)
from pipeline.faults import FailingSession, take_session_fault
from pipeline.providers import run_bound
from pipeline.sessions import LoadedSession, running_provider
from pipeline.tasks.base import Batch, Prepared, Task

OOM_MARKERS = ("out of memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation",
               "status_alloc_failed")
# Matched (lower case) against "<exception type>: <message>" when no OOM marker matches.
DEVICE_MARKERS = (
    # CUDA and its libraries, as onnxruntime words their failures
    "cuda failure", "cuda error", "cudaerror", "cuda_error", "cudnn failure", "cudnn_status",
    "cublas failure", "cublas_status", "cufft failure", "curand failure", "cusparse",
    # sticky CUDA errors in their own words
    "illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
    "launch timed out", "device-side assert", "uncorrectable ecc", "gpu has fallen off",
    "no cuda-capable device",
    # TensorRT and other execution providers
    "tensorrt", "nvinfer", "execution provider", "executionprovider", "ep error", "ep_fail",
    "epfail", "hip failure", "hiperror", "miopen", "rocblas", "migraphx", "openvino",
    "dxgi_error", "device removed",
)
# Single rows failing with no success at all means the model, not the data, is broken.
SYSTEMIC_FAILURES = 16


def classify_run_error(exc: BaseException) -> str:
    """"oom" (split, retry smaller), "device" (the session or device broke) or "row" (the data)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if any(m in text for m in OOM_MARKERS):
        return "oom"
    if any(m in text for m in DEVICE_MARKERS):
        return "device"
    return "row"


def _cause(message: str) -> str:
    """The part of an onnxruntime error that says what failed, without its boilerplate."""
    match = re.search(r"running (\S+) node\. Name:'[^']*' Status Message: (.*)", message)
    text = f"{match.group(1)} node: {match.group(2)}" if match else message
    return re.split(r"\s*;\s*(?:hostname|file)=", text)[0]


@dataclass
class Scored:
    rows: np.ndarray  # input positions of scored rows, ascending
    columns: pa.Table  # task outputs, aligned with rows
    bad: dict[int, str] = field(default_factory=dict)
    batches: int = 0
    oom_splits: int = 0
    infer_s: float = 0.0
    probes: int = 0  # health probes run, one per row that failed alone on a session with a probe
    provider_after: str | None = None  # provider read back from the session after the shard
    notes: dict[str, int] = field(default_factory=dict)  # the task's caveats -> rows


class _Runner:
    def __init__(self, task: Task, loaded: LoadedSession, session) -> None:
        self.task = task
        self.loaded = loaded
        self.session = session  # what runs: loaded.session, or a fault-injecting wrapper
        # GPU sessions run through an IOBinding; a fault-injecting wrapper runs plainly.
        self.bound_device = loaded.gpu_device_id if session is loaded.session else None
        self.pieces: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        self.bad: dict[int, str] = {}
        self.succeeded = 0
        self.failed = 0
        self.runs = 0
        self.oom_splits = 0
        self.probes = 0

    def run(self, batch: Batch) -> None:
        self.runs += 1
        try:
            # A task that runs its batches its own way (a generation loop, inputs fed beside
            # every batch) is not bound.
            if self.bound_device is not None and type(self.task).run_model is Task.run_model:
                outputs = run_bound(self.session, self.task.output_names, batch.feeds,
                                    "cuda", self.bound_device)
            else:
                outputs = self.task.run_model(self.session, batch.feeds)
        except Exception as exc:  # onnxruntime raises RuntimeError subclasses
            self._failed(batch, exc)
            return
        columns, bad = self.task.finish(batch, outputs)
        self.bad.update(bad)
        keep = np.array([int(r) not in bad for r in batch.rows], dtype=bool)
        self.pieces.append((batch.rows[keep], columns))
        self.succeeded += int(keep.sum())
        if self.loaded.probe_feeds is None and keep.any():
            i = int(np.argmax(keep))  # a copy: the probe must not keep the whole batch alive
            if batch.spans is not None:  # the first model row of that batch row
                i = int(batch.spans[i])
            self.loaded.probe_feeds = {k: np.array(v[i:i + 1]) for k, v in batch.feeds.items()}

    def _failed(self, batch: Batch, exc: Exception) -> None:
        message = one_line(exc)
        self.check_provider(message)
        kind = classify_run_error(exc)
        if kind == "device":  # splitting would only fail again, row by row
            raise self._device_error(f"{DEVICE_ERROR_PREFIX} on {self.loaded.active}: "
                                     f"{_cause(message)}")
        if len(batch) > 1:
            if kind == "oom":
                self.oom_splits += 1
            half = len(batch) // 2
            self.run(batch.subset(slice(0, half)))
            self.run(batch.subset(slice(half, None)))
            return
        if kind == "oom":
            # Maybe not the row's fault: the runner retries the shard in smaller pieces,
            # elsewhere, and dead-letters the row only when it alone still does not fit.
            raise OutOfMemory(f"out of memory on a single row: {message}")
        row = int(batch.rows[0])
        self._probe(row, message)
        self.failed += 1
        if self.succeeded == 0 and self.failed >= SYSTEMIC_FAILURES:
            raise ShardError(f"the model fails on every row: {message}")
        self.bad[row] = f"model failed: {message}"

    def _probe(self, row: int, message: str) -> None:
        """Run the known-good row: if the session fails it too, the session broke, not the row."""
        feeds = self.loaded.probe_feeds
        if feeds is None:
            return
        self.probes += 1
        try:
            self.task.run_model(self.session, feeds)
        except Exception as exc:
            self.check_provider(message)
            raise self._device_error(
                f"{DEVICE_ERROR_PREFIX} on {self.loaded.active}: the session fails a row it ran "
                f"before ({_cause(one_line(exc))}) after row {row} failed alone "
                f"({_cause(message)})") from exc

    def check_provider(self, after: str | None) -> str | None:
        """The provider running the session now; DeviceError if it is not the one it started on."""
        now = running_provider(self.session)
        active = self.loaded.active
        if now is None or now == active:
            return now
        why = f" (after: {_cause(after)})" if after else ""
        self.loaded.fallback_mid_job = f"{active} stopped running the session mid-job; " \
                                       f"{now} runs it now{why}"
        raise self._device_error(f"{DEVICE_ERROR_PREFIX}: the session switched from {active} to "
                                 f"{now} mid-job{why}", provider_after=now)

    def _device_error(self, message: str, provider_after: str | None = None) -> DeviceError:
        self.loaded.broken = message
        return DeviceError(message, provider=self.loaded.active, provider_after=provider_after)


def score_table(task: Task, session: LoadedSession, table: pa.Table,
                prepared: Prepared | None = None) -> Scored:
    """Score ``table``; pass ``prepared`` when the task's prepare() already ran elsewhere.

    Raises DeviceError when the session or device fails (see the module doc), and at once on a
    session that failed that way before: it is not run again.
    """
    if session.broken:
        raise DeviceError(f"{DEVICE_ERROR_PREFIX} on {session.active}: the session broke on an "
                          f"earlier shard and is not run again; a new worker process gets a new "
                          f"one (earlier: {session.broken})", provider=session.active)
    prepared = prepared if prepared is not None else task.prepare(table)
    fault = take_session_fault()  # PIPELINE_FAULTS "device": this shard's runs all fail
    runner = _Runner(task, session, FailingSession(session.session, fault) if fault else
                     session.session)
    started = time.perf_counter()
    for batch in prepared.batches:  # may be lazy (images decode while earlier batches infer)
        runner.run(batch)
    runner.bad.update(prepared.bad)  # complete only once the batches are consumed
    provider_after = runner.check_provider(None)  # a switch without an error is a switch too
    infer_s = time.perf_counter() - started

    schema = task.row_schema
    if runner.pieces:
        rows = np.concatenate([r for r, _ in runner.pieces])
        order = np.argsort(rows, kind="stable")  # back to input order
        columns = {
            f.name: pa.concat_arrays([c[f.name] for _, c in runner.pieces]).cast(f.type).take(
                pa.array(order))
            for f in schema
        }
        table_out = pa.table(columns, schema=schema)
        rows = rows[order]
    else:
        rows = np.zeros(0, dtype=np.int64)
        table_out = schema.empty_table()
    return Scored(rows=rows, columns=table_out, bad=runner.bad, batches=runner.runs,
                  oom_splits=runner.oom_splits, infer_s=infer_s, probes=runner.probes,
                  provider_after=provider_after, notes=dict(prepared.notes))

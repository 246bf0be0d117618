"""Run a task's batches through a session, isolating rows that break the model.

A failing batch is split in halves until the failing rows are found: they go to the
dead-letter list, the rest of the batch is still scored. A batch that fails for lack of
memory is retried in halves too. A model that fails on every row is a shard error,
not a pile of dead letters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.errors import ShardError, TransientError
from pipeline.sessions import LoadedSession
from pipeline.tasks.base import Batch, Prepared, Task

OOM_MARKERS = ("out of memory", "failed to allocate", "bad_alloc", "cudaerrormemoryallocation")
# Single rows failing with no success at all means the model, not the data, is broken.
SYSTEMIC_FAILURES = 16


@dataclass
class Scored:
    rows: np.ndarray  # input positions of scored rows, ascending
    columns: pa.Table  # task outputs, aligned with rows
    bad: dict[int, str] = field(default_factory=dict)
    batches: int = 0
    oom_splits: int = 0
    infer_s: float = 0.0


class _Runner:
    def __init__(self, task: Task, session: LoadedSession) -> None:
        self.task = task
        self.session = session
        self.pieces: list[tuple[np.ndarray, dict[str, pa.Array]]] = []
        self.bad: dict[int, str] = {}
        self.succeeded = 0
        self.failed = 0
        self.runs = 0
        self.oom_splits = 0

    def run(self, batch: Batch) -> None:
        self.runs += 1
        try:
            outputs = self.session.session.run(self.task.output_names, batch.feeds)
        except Exception as exc:  # onnxruntime raises RuntimeError subclasses
            self._failed(batch, exc)
            return
        columns, bad = self.task.finish(batch, outputs)
        self.bad.update(bad)
        keep = np.array([int(r) not in bad for r in batch.rows], dtype=bool)
        self.pieces.append((batch.rows[keep], columns))
        self.succeeded += int(keep.sum())

    def _failed(self, batch: Batch, exc: Exception) -> None:
        message = " ".join(str(exc).split())[:300]
        out_of_memory = any(m in message.lower() for m in OOM_MARKERS)
        if len(batch) > 1:
            if out_of_memory:
                self.oom_splits += 1
            half = len(batch) // 2
            self.run(batch.subset(slice(0, half)))
            self.run(batch.subset(slice(half, None)))
            return
        if out_of_memory:
            # Not the row's fault: retry the shard (another worker may have the memory).
            raise TransientError(f"out of memory on a single row: {message}")
        self.failed += 1
        if self.succeeded == 0 and self.failed >= SYSTEMIC_FAILURES:
            raise ShardError(f"the model fails on every row: {message}")
        self.bad[int(batch.rows[0])] = f"model failed: {message}"


def score_table(task: Task, session: LoadedSession, table: pa.Table,
                prepared: Prepared | None = None) -> Scored:
    """Score ``table``; pass ``prepared`` when the task's prepare() already ran elsewhere."""
    prepared = prepared if prepared is not None else task.prepare(table)
    runner = _Runner(task, session)
    runner.bad.update(prepared.bad)
    started = time.perf_counter()
    for batch in prepared.batches:
        runner.run(batch)
    infer_s = time.perf_counter() - started

    schema = task.output_schema
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
                  oom_splits=runner.oom_splits, infer_s=infer_s)

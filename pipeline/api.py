"""The notebook API: run_job for whole jobs on Ray, score/Scorer for in-process scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import ConfigError
from pipeline.inference import score_table
from pipeline.job import JobResult, execute, plan_job
from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BatchingSpec, JobSpec, TaskSpec, load_spec
from pipeline.tasks import build_task


def run_job(
    path_or_spec: str | Path | dict[str, Any] | JobSpec,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    fresh: bool = False,
    address: str | None = None,
) -> JobResult:
    """Run a job file (or spec) on Ray and return its result; raises PipelineError on exit 2."""
    spec = load_spec(path_or_spec, overrides)
    return execute(plan_job(spec), fresh=fresh, address=address, progress=progress)


def _task_spec(task: str | dict[str, Any] | Any, kind: str) -> Any:
    if task is None:
        task = kind
    if isinstance(task, str):
        task = {"kind": task}
    if isinstance(task, dict):
        try:
            return TypeAdapter(TaskSpec).validate_python(task)
        except ValidationError as exc:
            raise ConfigError(f"task: {exc.errors()[0]['msg']}") from None
    return task


class Scorer:
    """A loaded model and task, reusable across calls (the session is built once)."""

    def __init__(self, model: str, task: str | dict[str, Any] | None = None,
                 providers: tuple[str, ...] = ("cpu",), batching: BatchingSpec | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.bundle = fetch_bundle(model, storage_options)
        self.task_spec = _task_spec(task, self.bundle.spec.task)
        self.session = create_session(str(self.bundle.model_path),
                                      SessionSettings(providers=tuple(providers)))
        types = {i.name: i.type for i in self.session.session.get_inputs()}
        self.task = build_task(self.bundle, self.task_spec, batching or BatchingSpec(), types)

    def score(self, data: Any, passthrough: list[str] | None = None) -> Any:
        """Score every row; outputs are null and ``_error`` says why for rows that failed.

        Accepts a pyarrow Table or a pandas DataFrame and returns the same kind, in input order.
        """
        is_pandas = not isinstance(data, pa.Table)
        table = pa.Table.from_pandas(data, preserve_index=False) if is_pandas else data
        self.task.check_columns(table.schema, "score()")
        scored = score_table(self.task, self.session, table)
        keep = list(passthrough) if passthrough is not None else table.column_names
        columns = {name: table[name] for name in keep}
        position = np.full(table.num_rows, -1, dtype=np.int64)
        position[scored.rows] = np.arange(len(scored.rows))
        index = pa.array(position, mask=position < 0)
        for name in scored.columns.column_names:
            columns[name] = scored.columns[name].take(index)
        if scored.bad:
            columns["_error"] = pa.array([scored.bad.get(i) for i in range(table.num_rows)],
                                         pa.string())
        result = pa.table(columns)
        return result.to_pandas() if is_pandas else result


def score(data: Any, model: str, task: str | dict[str, Any] | None = None,
          passthrough: list[str] | None = None, providers: tuple[str, ...] = ("cpu",),
          batching: BatchingSpec | None = None) -> Any:
    """Score a table or DataFrame in this process, without Ray. See ``Scorer`` to reuse a model."""
    return Scorer(model, task, providers, batching).score(data, passthrough)

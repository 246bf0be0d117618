"""The notebook API: run_job for whole jobs on Ray, score/Scorer for in-process scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.batch_formats import from_arrow, to_arrow
from pipeline.job import JobResult, Start, run_spec
from pipeline.job_file import load_spec
from pipeline.progress import Console
from pipeline.scoring import LoadedModel
from pipeline.spec import BatchingSpec, JobSpec


def run_job(
    path_or_spec: str | Path | dict[str, Any] | JobSpec,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    fresh: bool = False,
    address: str | None = None,
    wait: bool = False,
) -> JobResult:
    """Run a job file (or spec) on Ray and return its result; raises PipelineError on exit 2.
    ``wait``: when another driver holds the output, wait for it instead of raising."""
    spec = load_spec(path_or_spec, overrides)
    return run_spec(spec, Start.FRESH if fresh else Start.CONTINUE, address,
                    Console(show_progress=progress), wait=wait)


class Scorer:
    """A loaded model and task, reusable across calls (the session is built once)."""

    def __init__(self, model: str, task: str | dict[str, Any] | None = None,
                 providers: tuple[str, ...] = ("cpu",), batching: BatchingSpec | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.model = LoadedModel(model, task, providers=providers, batching=batching,
                                 storage_options=storage_options)
        self.bundle = self.model.bundle
        self.task_spec = self.model.task_spec
        self.session = self.model.session
        self.task = self.model.task

    def score(self, data: Any, passthrough: list[str] | None = None) -> Any:
        """Score every row; outputs are null and ``_error`` says why for rows that failed.

        Accepts a pyarrow Table, a pandas DataFrame or a dict of numpy arrays and returns the
        same kind, in input order. ``_error`` is added only when some row failed.
        """
        table, kind = to_arrow(data)
        prediction = self.model.predict(table, passthrough, "score()")
        result = prediction.with_errors() if prediction.bad else prediction.good_rows()
        return from_arrow(result, kind)


def score(data: Any, model: str, task: str | dict[str, Any] | None = None,
          passthrough: list[str] | None = None, providers: tuple[str, ...] = ("cpu",),
          batching: BatchingSpec | None = None) -> Any:
    """Score a table or DataFrame in this process, without Ray. See ``Scorer`` to reuse a model."""
    return Scorer(model, task, providers, batching).score(data, passthrough)

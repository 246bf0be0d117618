"""In-process scoring: the core under ``pipeline.Scorer`` and ``OnnxPredictor`` for Ray Data.

``LoadedModel`` is a bundle, its task and its session, loaded the way the job's workers load
them (``fetch_bundle``, ``SessionCache``, ``build_task``), and scores an Arrow table with the
job's batching and bad-row rules (``score_table``). Nothing here holds module-global state: a
session belongs to the object that created it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from pipeline.dead_letters import dead_letter_table
from pipeline.errors import ConfigError
from pipeline.inference import score_table
from pipeline.job_file import validation_message
from pipeline.models.importing import open_model
from pipeline.sessions import PROVIDER_NAMES, SessionCache, SessionSettings
from pipeline.spec import BatchingSpec, TaskSpec
from pipeline.tasks import build_task, resolve_task
from pipeline.tasks.chunking import explode
from pipeline.tasks.classify import feature_columns_from

ERROR_COLUMN = "_error"


def task_spec(task: str | dict[str, Any] | Any, kind: str) -> Any:
    """A task spec from a kind name, a dict like the job file's ``task:`` or a spec object."""
    if task is None:
        task = kind
    if isinstance(task, str):
        task = {"kind": task}
    if isinstance(task, dict):
        try:
            return TypeAdapter(TaskSpec).validate_python(task)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, prefix="task")) from exc
    return task


def batching_spec(batching: BatchingSpec | dict[str, Any] | None) -> BatchingSpec:
    if batching is None or isinstance(batching, BatchingSpec):
        return batching or BatchingSpec()
    try:
        return BatchingSpec.model_validate(batching)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, prefix="batching")) from exc


@dataclass
class Prediction:
    """One scored table: kept input columns and task outputs, a row per input row."""

    table: pa.Table  # outputs are null for bad rows
    bad: dict[int, str]  # input position -> reason
    explodes: str | None = None  # a list column that becomes a row per item (chunks)

    def errors(self) -> pa.Array:
        reasons = np.full(self.table.num_rows, None, dtype=object)
        for row, reason in self.bad.items():
            reasons[row] = reason
        return pa.array(reasons, pa.string())

    def with_errors(self) -> pa.Table:
        return self._rows(self.table.append_column(ERROR_COLUMN, self.errors()))

    def good_rows(self) -> pa.Table:
        if not self.bad:
            return self._rows(self.table)
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[list(self.bad)] = False
        return self._rows(self.table.filter(pa.array(keep)))

    def _rows(self, table: pa.Table) -> pa.Table:
        return explode(table, self.explodes) if self.explodes else table


class LoadedModel:
    """A model bundle, its task and one ONNX Runtime session, owned by this object."""

    def __init__(self, model: str, task: str | dict[str, Any] | Any = None, *,
                 providers: tuple[str, ...] | list[str] = ("cpu",), intra_op_threads: int = 0,
                 batching: BatchingSpec | dict[str, Any] | None = None,
                 storage_options: dict[str, Any] | None = None, sha256: str | None = None) -> None:
        providers = tuple(providers)
        unknown = [p for p in providers if p not in PROVIDER_NAMES]
        if unknown or not providers:
            raise ConfigError(f"providers: {unknown[0] if unknown else 'empty'!r} is not a provider; "
                              f"use some of {', '.join(PROVIDER_NAMES)} in order of preference")
        # A bundle, or a converter's output imported once per node (cached by content).
        self.bundle, self.imported = open_model(model, storage_options, sha256)
        self.task_spec = resolve_task(None if task is None else
                                      task_spec(task, self.bundle.spec.task), self.bundle)
        self.sessions = SessionCache()
        self.session = self.sessions.get(
            str(self.bundle.model_path), self.bundle.sha256,
            SessionSettings(providers=providers, intra_op_threads=intra_op_threads),
            self.bundle.spec.runtime)
        types = {i.name: i.type for i in self.session.session.get_inputs()}
        self.task = build_task(self.bundle, self.task_spec, batching_spec(batching), types,
                               self.session.active)

    @property
    def output_names(self) -> list[str]:
        return self.task.output_schema.names

    def predict(self, table: pa.Table, passthrough: list[str] | None = None,
                where: str = "score()") -> Prediction:
        """Score every row of ``table``; bad rows get null outputs and a reason."""
        if getattr(self.task, "needs_feature_names", False):  # the converter kept none
            self.task.bind_features(feature_columns_from(
                table.column_names, list(passthrough or []), self.task.feature_count, where))
        self.task.check_columns(table.schema, where)
        keep = list(passthrough) if passthrough is not None else table.column_names
        missing = [c for c in keep if c not in table.column_names]
        if missing:
            raise ConfigError(f"{where}: passthrough column {missing[0]!r} is not in the input "
                              f"(columns: {', '.join(table.column_names[:20])})")
        clash = [c for c in keep if c in self.output_names or c == ERROR_COLUMN]
        if clash:
            raise ConfigError(
                f"{where}: input column {clash[0]!r} has the name of an output column; leave it "
                "out of passthrough or name the task's output differently (task output_column, "
                "label_column, ...)")
        scored = score_table(self.task, self.session, table)
        columns = {name: table[name] for name in keep}
        position = np.full(table.num_rows, -1, dtype=np.int64)
        position[scored.rows] = np.arange(len(scored.rows))
        index = pa.array(position, mask=position < 0)
        for name in scored.columns.column_names:
            columns[name] = scored.columns[name].take(index)
        return Prediction(pa.table(columns), dict(scored.bad), self.task.explodes)

    def dead_letters(self, table: pa.Table, prediction: Prediction,
                     passthrough: list[str] | None) -> pa.Table | None:
        """The bad rows with the columns that identify them and ``_reason``, in input order."""
        columns = None if passthrough is None else [*passthrough, *self.task.input_columns]
        return dead_letter_table(table, prediction.bad, columns)

"""In-process scoring: the core under ``pipeline.Scorer`` and ``OnnxPredictor`` for Ray Data.

``LoadedModel`` is a bundle, its task and its session, loaded the way the job's workers load
them (``fetch_bundle``, ``SessionCache``, ``build_task``), and scores an Arrow table with the
job's batching and bad-row rules (``score_table``). ``OnnxPredictor`` wraps it as a callable
class for ``Dataset.map_batches``. Nothing here holds module-global state: a session belongs to
the object that created it, so the class pickles by reference and each Ray actor builds its own.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import TypeAdapter, ValidationError

from pipeline import storage
from pipeline.commit import META_MODEL
from pipeline.errors import ConfigError
from pipeline.inference import score_table
from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import PROVIDER_NAMES, SessionCache, SessionSettings
from pipeline.spec import BatchingSpec, TaskSpec
from pipeline.tasks import build_task

ERROR_COLUMN = "_error"
REASON_COLUMN = "_reason"
BAD_ROW_MODES = ("keep", "drop")
BatchKind = Literal["arrow", "pandas", "numpy"]


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
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"task{'.' + key if key else ''}: {err['msg']}") from None
    return task


def batching_spec(batching: BatchingSpec | dict[str, Any] | None) -> BatchingSpec:
    if batching is None or isinstance(batching, BatchingSpec):
        return batching or BatchingSpec()
    try:
        return BatchingSpec.model_validate(batching)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"batching.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def _ray_worker_context() -> Any:
    """Ray's runtime context when this process is a Ray worker (an actor or task), else None.
    Ray is never imported here, only asked if already loaded."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        return context if context.worker.mode == ray.WORKER_MODE else None
    except Exception:
        return None


def ray_actor_threads() -> int:
    """One intra-op thread per CPU Ray gave this actor, as the job's workers do; 0 (onnxruntime
    picks) outside a Ray worker."""
    context = _ray_worker_context()
    try:
        cpus = context.get_assigned_resources().get("CPU") if context else None
    except Exception:
        cpus = None
    return max(1, int(cpus)) if cpus else 0


def check_not_relative(key: str, uri: str | None) -> None:
    """A Ray worker never resolves a path against its own working directory (not the caller's)."""
    if uri and storage.is_local(uri) and not Path(uri.removeprefix("file://")).is_absolute() \
            and _ray_worker_context() is not None:
        raise ConfigError(f"{key}: {uri!r} is a relative path, and this runs in a Ray worker whose "
                          "working directory is not yours; pass an absolute path or a URL")


@dataclass
class Prediction:
    """One scored table: kept input columns and task outputs, a row per input row."""

    table: pa.Table  # outputs are null for bad rows
    bad: dict[int, str]  # input position -> reason

    def errors(self) -> pa.Array:
        reasons = np.full(self.table.num_rows, None, dtype=object)
        for row, reason in self.bad.items():
            reasons[row] = reason
        return pa.array(reasons, pa.string())

    def with_errors(self) -> pa.Table:
        return self.table.append_column(ERROR_COLUMN, self.errors())

    def good_rows(self) -> pa.Table:
        if not self.bad:
            return self.table
        keep = np.ones(self.table.num_rows, dtype=bool)
        keep[list(self.bad)] = False
        return self.table.filter(pa.array(keep))


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
        self.bundle = fetch_bundle(model, storage_options, sha256)  # cached per node by bundle identity
        self.task_spec = task_spec(task, self.bundle.spec.task)
        self.sessions = SessionCache()
        self.session = self.sessions.get(
            str(self.bundle.model_path), self.bundle.sha256,
            SessionSettings(providers=providers, intra_op_threads=intra_op_threads))
        types = {i.name: i.type for i in self.session.session.get_inputs()}
        self.task = build_task(self.bundle, self.task_spec, batching_spec(batching), types,
                               self.session.active)

    @property
    def output_names(self) -> list[str]:
        return self.task.output_schema.names

    def predict(self, table: pa.Table, passthrough: list[str] | None = None,
                where: str = "score()") -> Prediction:
        """Score every row of ``table``; bad rows get null outputs and a reason."""
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
        return Prediction(pa.table(columns), dict(scored.bad))

    def dead_letters(self, table: pa.Table, prediction: Prediction,
                     passthrough: list[str] | None) -> pa.Table | None:
        """The bad rows with the columns that identify them and ``_reason``, in input order."""
        if not prediction.bad:
            return None
        rows = sorted(prediction.bad)
        names = table.column_names if passthrough is None else \
            [c for c in dict.fromkeys([*passthrough, *self.task.input_columns]) if c in table.column_names]
        dead = table.select(names).take(pa.array(rows, pa.int64()))
        return dead.append_column(REASON_COLUMN, pa.array([prediction.bad[r] for r in rows], pa.string()))


# ---------------------------------------------------------------------- batch formats


def to_arrow(batch: Any) -> tuple[pa.Table, BatchKind]:
    """An Arrow table from the batch formats Ray Data hands out, and which one it was."""
    if isinstance(batch, pa.Table):
        return batch, "arrow"
    if isinstance(batch, dict):
        return pa.table({name: _numpy_column(name, v) for name, v in batch.items()}), "numpy"
    pandas = sys.modules.get("pandas")  # never imported here: a DataFrame means it is loaded
    if pandas is not None and isinstance(batch, pandas.DataFrame):
        return pa.Table.from_pandas(batch, preserve_index=False), "pandas"
    raise ConfigError(f"expected a pyarrow.Table, a pandas.DataFrame or a dict of numpy arrays, "
                      f"got {type(batch).__name__}")


def _numpy_column(name: str, values: Any) -> pa.Array:
    array = np.asarray(values)
    if array.ndim == 1:
        return pa.array(array, from_pandas=array.dtype == object)  # None and NaN become null
    if array.ndim == 2:
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    raise ConfigError(f"column {name!r} holds {array.ndim}-d arrays; use batch_format='pyarrow'")


def from_arrow(table: pa.Table, kind: BatchKind, arrow_dtypes: bool = False) -> Any:
    """``table`` in the batch format ``kind``.

    pandas: ``arrow_dtypes`` keeps every column Arrow-backed (``pd.ArrowDtype``, as Ray Data
    hands batches out), so null outputs stay null and list columns keep their type.
    numpy: fixed-size list columns become 2-D arrays; null rows of float lists hold NaN.
    """
    if kind == "arrow":
        return table
    if kind == "pandas":
        if arrow_dtypes:
            import pandas as pd

            return table.to_pandas(types_mapper=pd.ArrowDtype)
        return table.to_pandas()
    return {name: _numpy_values(table[name]) for name in table.column_names}


def _numpy_values(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    kind = array.type
    if pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type):
        out = np.full((len(array), kind.list_size), np.nan, dtype=kind.value_type.to_pandas_dtype())
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        out[valid] = array.filter(pa.array(valid)).flatten().to_numpy().reshape(-1, kind.list_size)
        return out
    return array.to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------- Ray Data


class OnnxPredictor:
    """Score Ray Data batches with an ONNX model bundle: a callable class for ``map_batches``.

        ds.map_batches(pipeline.OnnxPredictor, batch_format="pyarrow",
                       compute=ray.data.ActorPoolStrategy(size=4),  # concurrency=4 before Ray 2.51
                       fn_constructor_kwargs={"model": "s3://b/models/minilm", "task": "embed"})

    The constructor runs once per Ray actor (so local paths must be absolute): it fetches the
    bundle (remote bundles are copied once per node into a cache keyed by the bundle's identity,
    and verified), creates the ONNX Runtime session (``providers`` in order of preference,
    e.g. ``("cuda", "cpu")``; a fallback is logged and kept in ``self.fallback``) and builds
    the task exactly as the job's workers do. ``intra_op_threads`` defaults to the CPUs Ray
    gave the actor (0 = onnxruntime picks).

    ``__call__(batch)`` takes a ``pyarrow.Table`` (preferred), a ``pandas.DataFrame`` or a dict
    of numpy arrays and returns the same kind: the input columns (or ``passthrough``) and the
    task's output columns, a row per input row in input order. Text rows are sorted by length
    and cut into model batches by ``batching`` (``max_tokens``, ``max_rows``), as in a job.
    pandas batches come back with Arrow-backed dtypes (as Ray Data hands them out), so null
    outputs stay null; in numpy batches an embedding or probabilities column is a 2-D array
    whose bad rows hold NaN.

    Bad rows (null or empty text, non-numeric or non-finite features, rows that make the
    tokenizer or the model fail; a failing model batch is split until they are found) never
    fail the batch:

    - ``on_bad_row="keep"`` (default): they stay, with null outputs, and the ``_error`` column
      says why. ``_error`` is in every output batch (null for good rows), so batches share one
      schema and Ray Data can concatenate them.
    - ``on_bad_row="drop"``: they are left out of the output (no ``_error`` column).
    - ``dead_letter_uri`` (any fsspec URL; ``storage_options`` apply to it and to the model):
      each batch with bad rows also writes them, with ``_reason``, to
      ``<dead_letter_uri>/bad-<hash>.parquet`` before the batch is returned. The name is a hash
      of the model and of those rows (their values and reasons), so a batch that Ray Data
      retries overwrites its own file instead of adding a duplicate. Rows are exactly once
      across files when Ray re-forms a retried batch with the same rows (deterministic input,
      fixed ``batch_size``); otherwise dedupe on an id column. Identical bad rows in two
      batches share one file, so keep an id column in ``passthrough``.

    A model that fails on every row, or that runs out of memory on a single row, raises: the
    batch fails and Ray Data's retry rules apply. Instances pickle as their constructor
    arguments; no session is ever pickled.
    """

    def __init__(self, model: str, task: str | dict[str, Any] | None = None, *,
                 passthrough: list[str] | None = None, providers: tuple[str, ...] = ("cpu",),
                 intra_op_threads: int | None = None,
                 batching: BatchingSpec | dict[str, Any] | None = None,
                 on_bad_row: Literal["keep", "drop"] = "keep", dead_letter_uri: str | None = None,
                 storage_options: dict[str, Any] | None = None, sha256: str | None = None) -> None:
        if on_bad_row not in BAD_ROW_MODES:
            raise ConfigError(f"on_bad_row: {on_bad_row!r}; use one of {', '.join(BAD_ROW_MODES)}")
        self._config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.passthrough = list(passthrough) if passthrough is not None else None
        self.on_bad_row = on_bad_row
        self.storage_options = storage_options or {}
        self.dead_letter_uri = dead_letter_uri.rstrip("/") if dead_letter_uri else None
        check_not_relative("model", model)
        check_not_relative("dead_letter_uri", dead_letter_uri)
        threads = ray_actor_threads() if intra_op_threads is None else intra_op_threads
        self.model = LoadedModel(model, task, providers=providers, intra_op_threads=threads,
                                 batching=batching, storage_options=storage_options, sha256=sha256)
        self.provider = self.model.session.active
        self.fallback = self.model.session.fallback

    def __call__(self, batch: Any) -> Any:
        table, kind = to_arrow(batch)
        prediction = self.model.predict(table, self.passthrough, "OnnxPredictor")
        if self.dead_letter_uri:
            self._write_dead_letters(self.model.dead_letters(table, prediction, self.passthrough))
        out = prediction.good_rows() if self.on_bad_row == "drop" else prediction.with_errors()
        return from_arrow(out, kind, arrow_dtypes=True)

    def _write_dead_letters(self, dead: pa.Table | None) -> str | None:
        if dead is None:
            return None
        dead = dead.replace_schema_metadata(None).combine_chunks()
        digest = hashlib.sha256(self.model.bundle.identity.encode())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, dead.schema) as writer:
            writer.write_table(dead)
        digest.update(sink.getvalue())
        uri = storage.join(self.dead_letter_uri, f"bad-{digest.hexdigest()[:32]}.parquet")
        fs, path = storage.filesystem(uri, self.storage_options)
        dead = dead.replace_schema_metadata({META_MODEL: self.model.bundle.sha256.encode()})
        with storage.atomic_writer(fs, path) as fh:
            pq.write_table(dead, fh, compression="zstd")
        return uri

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._config)  # rebuilt from its arguments: sessions never travel

    def __setstate__(self, config: dict[str, Any]) -> None:
        self.__init__(**config)

    def __repr__(self) -> str:
        return f"OnnxPredictor({self._config['model']!r}, task={self.model.task_spec.kind!r})"

"""``OnnxPredictor``: a model bundle as a callable class for Ray Data's ``map_batches``.

It wraps ``pipeline.scoring.LoadedModel`` (the job's own bundle fetch, session and task) and
converts Ray Data's batch formats (``pipeline.batch_formats``). A session belongs to the object
that created it, so the class pickles by reference and each Ray actor builds its own.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.batch_formats import from_arrow, to_arrow
from pipeline.errors import ConfigError
from pipeline.metadata import META_MODEL
from pipeline.ray_context import check_not_relative, ray_actor_threads
from pipeline.scoring import LoadedModel
from pipeline.spec import BatchingSpec

BAD_ROW_MODES = ("keep", "drop")


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

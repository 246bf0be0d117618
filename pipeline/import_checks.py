"""What ``python -m pipeline.models import`` checks with a user's own rows: the batch check on
real rows (``--sample``), and the pipeline's outputs against the source framework's
(``--reference``). A mismatch fails the import: nothing is written.

Both score through the task a job uses, so the outputs compared are what a job would write
(pooled and normalized embeddings, probabilities, tensors with their shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, ModelError, one_line
from pipeline.models.bundle import LocalBundle
from pipeline.models.checks import CHECK_ROWS
from pipeline.models.importing import Feeds, Verify
from pipeline.scoring import LoadedModel, task_spec
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BatchingSpec
from pipeline.tasks import build_task
from pipeline.tasks.classify import feature_columns_from

EMBEDDING_COLUMNS = ("embedding",)
BOX_ATOL = 1.0  # detections: boxes within a pixel (scores within atol)
# A sample's row ids: never a model input (for a model whose converter kept no feature names,
# the sample's other columns are its features, in order).
ID_COLUMNS = ["id"]


def read_sample(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"--sample {path}: not a readable Parquet file ({one_line(exc, 160)})"
                          ) from exc


def sample_feeds(sample: pa.Table, where: str) -> Feeds:
    """The first rows of the sample, prepared as the bundle's task prepares a job's rows."""

    def feeds(bundle: LocalBundle) -> dict[str, Any]:
        session = create_session(str(bundle.model_path), SessionSettings()).session
        types = {i.name: i.type for i in session.get_inputs()}
        batching = BatchingSpec(max_rows=CHECK_ROWS, max_tokens=1 << 30)
        task = build_task(bundle, task_spec(None, bundle.spec.task), batching, types)
        if getattr(task, "needs_feature_names", False):
            task.bind_features(feature_columns_from(sample.column_names, ID_COLUMNS,
                                                    task.feature_count, where))
        task.check_columns(sample.schema, where)
        prepared = task.prepare(sample.slice(0, CHECK_ROWS * 4))
        rows = [b for b in prepared.batches if len(b) >= 2]
        if not rows:
            raise ConfigError(f"{where}: fewer than 2 rows of the sample can be scored "
                              f"({len(prepared.bad)} bad: {next(iter(prepared.bad.values()), '')})")
        return rows[0].feeds

    return feeds


def reference_check(sample: pa.Table, reference: Path, atol: float,
                    min_cosine: float) -> Verify:
    """Fail the import when a row's output differs from what the source framework computed."""
    expected = read_reference(reference)

    def verify(bundle: LocalBundle) -> None:
        model = LoadedModel(str(bundle.path), bundle.spec.task)
        ids = [c for c in ID_COLUMNS if c in sample.column_names]
        prediction = model.predict(sample, ids, "--sample")
        for name, want in expected.items():
            if name not in prediction.table.column_names:
                raise ModelError(f"--reference {reference}: {name!r} is no output of the "
                                 f"pipeline (outputs: {', '.join(prediction.table.column_names)})")
            if len(want) != sample.num_rows:
                raise ModelError(f"--reference {reference}: {name} has {len(want)} rows, the "
                                 f"sample {sample.num_rows}")
            got = prediction.table[name].to_pylist()
            problem = _compare(name, got, want, atol, min_cosine)
            if problem:
                raise ModelError(f"--reference {reference}: {problem}")

    return verify


def read_reference(path: Path) -> dict[str, list[Any]]:
    """Reference outputs by output column: an .npz of arrays, or a Parquet file."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {name: list(data[name]) for name in data.files}
        table = pq.read_table(path)
        return {name: table[name].to_pylist() for name in table.column_names}
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ConfigError(f"--reference {path}: not a readable .npz or Parquet file "
                          f"({one_line(exc, 160)})") from exc


def _records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def _sparse(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"indices", "values"}


def _compare_sparse(got: dict[str, Any], want: dict[str, Any], atol: float) -> str | None:
    """Sparse vectors as the dense vectors they stand for: a weight below ``atol`` that one
    side rounded to zero is no difference."""
    size = max([*got["indices"], *want["indices"], -1]) + 1
    a, b = np.zeros(size), np.zeros(size)
    a[got["indices"]] = got["values"]
    b[want["indices"]] = want["values"]
    if np.allclose(a, b, atol=atol, rtol=0):
        return None
    worst = int(np.abs(a - b).argmax())
    return f"differs at index {worst}: {a[worst]:.6g}, the reference {b[worst]:.6g}"


def _compare_records(got: Any, want: Any, atol: float) -> str | None:
    """Lists of structs (entities, detections): as many, fields equal, numbers within atol."""
    got, want = list(got if got is not None else []), list(want if want is not None else [])
    if len(got) != len(want):
        return f"has {len(got)} items, the reference {len(want)}: {got!r} != {want!r}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for key, expected in w.items():
            value = g.get(key) if isinstance(g, dict) else None
            if isinstance(expected, float) or (isinstance(expected, list) and expected and
                                               isinstance(expected[0], float)):
                close = value is not None and np.allclose(
                    np.asarray(value, np.float64), np.asarray(expected, np.float64),
                    atol=max(atol, BOX_ATOL) if key == "box" else atol, rtol=0)
            else:
                close = value == expected
            if not close:
                return f"item {i} has {key} {value!r}, the reference {expected!r}"
    return None


def _compare(name: str, got: list[Any], want: list[Any], atol: float,
             min_cosine: float) -> str | None:
    for row, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:  # the framework gave nothing for it either (an empty text, say)
            if g is not None:
                return f"row {row}: {name} is {g!r}, the reference has none"
            continue
        if g is None:
            return f"row {row}: the pipeline scored no {name} (dead-lettered)"
        if _sparse(w):
            problem = _compare_sparse(g, w, atol)
            if problem:
                return f"row {row}: {name} {problem}"
            continue
        if _records(g) or _records(w):
            problem = _compare_records(g, w, atol)
            if problem:
                return f"row {row}: {name} {problem}"
            continue
        a, b = np.asarray(g), np.asarray(w)
        if a.dtype.kind in "OUS" or b.dtype.kind in "OUS" or a.dtype.kind == "b":
            if a.tolist() != b.tolist() and str(g) != str(w):
                return f"row {row}: {name} is {g!r}, the reference {w!r}"
            continue
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.shape != b.shape:
            return f"row {row}: {name} has shape {list(a.shape)}, the reference {list(b.shape)}"
        if name in EMBEDDING_COLUMNS:
            cosine = float(a.ravel() @ b.ravel() /
                           max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            if cosine < min_cosine:
                return f"row {row}: {name} has cosine {cosine:.5f} to the reference (< {min_cosine})"
        elif not np.allclose(a, b, atol=atol, rtol=0):
            worst = float(np.abs(a - b).max())
            return f"row {row}: {name} differs by {worst:.3g} from the reference (> {atol})"
    return None

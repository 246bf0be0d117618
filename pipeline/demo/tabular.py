"""Tabular demo: a scikit-learn classifier on the breast cancer data set, as a classify bundle.

Needs the ``demo`` extra (scikit-learn, skl2onnx); the pipeline itself does not.
The export is reproducible: a fixed solver and data set give the same model and bundle.yaml
bytes in every checkout (with the same package versions, recorded in ``source``).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.models.bundle import BundleSpec, write_bundle_spec
from pipeline.models.onnx_graph import IR_VERSION, OPSET
from pipeline.storage import sha256_file


def feature_names() -> list[str]:
    from sklearn.datasets import load_breast_cancer

    names = load_breast_cancer().feature_names
    return [re.sub(r"\W+", "_", str(n)).strip("_") for n in names]


def train() -> tuple[Any, np.ndarray, list[str]]:
    """Fit a scaled logistic regression; returns (estimator, X, class names)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(data.data, data.target)
    return model, data.data, [str(n) for n in data.target_names]


def export_tabular_bundle(out: Path) -> BundleSpec:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    estimator, features, labels = train()
    names = feature_names()
    onx = to_onnx(
        estimator,
        initial_types=[("features", FloatTensorType([None, len(names)]))],
        options={"zipmap": False},  # probabilities as a plain [N, classes] tensor
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    onx.ir_version = IR_VERSION
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(onx, str(out / "model.onnx"))
    spec = BundleSpec(
        task="classify",
        sha256=sha256_file(str(out / "model.onnx")),
        inputs={"features": "features"},
        outputs={"probabilities": "probabilities"},
        features=names,
        labels=labels,
        source={"exporter": "skl2onnx", "estimator": str(estimator),
                "dataset": "sklearn.datasets.load_breast_cancer", "rows": len(features),
                "versions": _versions("scikit-learn", "skl2onnx", "onnx")},
    )
    write_bundle_spec(out, spec)
    return spec


def _versions(*dists: str) -> dict[str, str]:
    # Package versions, never paths: the same export anywhere gives the same bundle bytes.
    # skl2onnx stamps its own version into the model (producer_version) as well.
    return {name: importlib.metadata.version(name) for name in dists}


def make_scoring_table(rows: int, seed: int = 0, start_id: int = 0) -> pa.Table:
    """Rows drawn from the data set with a little noise, so they look like new patients."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer().data
    rng = np.random.default_rng(seed)
    picked = data[rng.integers(0, len(data), size=rows)]
    noisy = picked + rng.normal(0.0, 0.02, size=picked.shape) * data.std(axis=0)
    noisy = np.maximum(noisy, 0.0)
    columns: dict[str, Any] = {"id": pa.array(np.arange(start_id, start_id + rows, dtype=np.int64))}
    for i, name in enumerate(feature_names()):
        columns[name] = pa.array(noisy[:, i])
    return pa.table(columns)


def write_scoring_data(out: Path, rows: int, files: int = 4, row_group_size: int = 2000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files) if rows else 0
    for i in range(files):
        start = i * per_file
        count = max(0, min(per_file, rows - start))
        table = make_scoring_table(count, seed=i, start_id=start)
        pq.write_table(table, out / f"patients-{i:03d}.parquet", row_group_size=row_group_size)

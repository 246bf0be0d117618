"""The breast-cancer classify bundle scores like the scikit-learn estimator it came from."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.demo.tabular import export_tabular_bundle, feature_names, make_scoring_table, train
from pipeline.inference import score_table
from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BatchingSpec, ClassifyTaskSpec
from pipeline.tasks import build_task


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("breast_cancer")
    spec = export_tabular_bundle(out)
    bundle = fetch_bundle(str(out))
    session = create_session(str(bundle.model_path), SessionSettings())
    input_types = {i.name: i.type for i in session.session.get_inputs()}
    return spec, bundle, session, input_types


def _task(classifier, batching: BatchingSpec | None = None):
    _, bundle, session, input_types = classifier
    task = build_task(bundle, ClassifyTaskSpec(kind="classify"), batching or BatchingSpec(),
                      input_types)
    return task, session


def _probabilities(table: pa.Table, classes: int) -> np.ndarray:
    column = table["probabilities"].combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float64).reshape(-1, classes)


def test_exported_spec(classifier):
    spec, bundle, _, input_types = classifier
    assert spec.task == "classify"
    assert spec.features == feature_names()
    assert len(spec.features) == 30
    assert spec.labels == ["malignant", "benign"]
    assert bundle.sha256 == spec.sha256
    assert input_types == {"features": "tensor(float)"}


@pytest.mark.parametrize("max_rows", [256, 7])
def test_probabilities_match_sklearn(classifier, max_rows):
    spec, _, _, _ = classifier
    task, session = _task(classifier, BatchingSpec(max_rows=max_rows))
    table = make_scoring_table(500)
    scored = score_table(task, session, table)
    assert scored.bad == {}
    np.testing.assert_array_equal(scored.rows, np.arange(500))
    assert scored.batches == math.ceil(500 / max_rows)

    estimator, _, labels = train()
    features = np.column_stack([table[name].to_numpy() for name in feature_names()])
    expected = estimator.predict_proba(features)
    probs = _probabilities(scored.columns, len(labels))
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    # The sample must contain both classes for the label check to mean anything.
    assert set(expected.argmax(axis=1)) == {0, 1}

    best = probs.argmax(axis=1)
    assert scored.columns["label"].to_pylist() == [labels[i] for i in best]
    assert scored.columns["label"].to_pylist() == [spec.labels[i] for i in expected.argmax(1)]
    np.testing.assert_allclose(scored.columns["score"].to_numpy(), probs.max(axis=1), atol=1e-6)


def test_feature_columns_are_read_by_name_not_position(classifier):
    task, session = _task(classifier)
    table = make_scoring_table(50)
    shuffled = table.select(["id", *reversed(feature_names())])
    a = score_table(task, session, table)
    b = score_table(task, session, shuffled)
    np.testing.assert_array_equal(_probabilities(a.columns, 2), _probabilities(b.columns, 2))


def test_null_and_nan_features_are_dead_lettered(classifier):
    task, session = _task(classifier)
    table = make_scoring_table(20)
    names = feature_names()
    radius = table["mean_radius"].to_pylist()
    radius[3] = None
    area = table["worst_area"].to_pylist()
    area[7] = float("nan")
    table = table.set_column(names.index("mean_radius") + 1, "mean_radius",
                             pa.array(radius, pa.float64()))
    table = table.set_column(names.index("worst_area") + 1, "worst_area",
                             pa.array(area, pa.float64()))
    assert table["mean_radius"].null_count == 1

    scored = score_table(task, session, table)
    assert set(scored.bad) == {3, 7}
    assert "mean_radius" in scored.bad[3]
    assert "worst_area" in scored.bad[7]
    good = [i for i in range(20) if i not in (3, 7)]
    np.testing.assert_array_equal(scored.rows, good)
    assert scored.columns.num_rows == 18

    # The remaining rows score as they do in a clean table.
    clean = score_table(task, session, make_scoring_table(20))
    np.testing.assert_allclose(_probabilities(scored.columns, 2),
                               _probabilities(clean.columns, 2)[good], atol=1e-7)


def test_non_numeric_feature_is_dead_lettered(classifier):
    task, session = _task(classifier)
    table = make_scoring_table(5)
    texture = [str(v) for v in table["mean_texture"].to_pylist()]
    texture[2] = "n/a"
    table = table.set_column(feature_names().index("mean_texture") + 1, "mean_texture",
                             pa.array(texture, pa.string()))
    scored = score_table(task, session, table)
    assert list(scored.bad) == [2]
    assert "mean_texture" in scored.bad[2] and "'n/a'" in scored.bad[2]
    np.testing.assert_array_equal(scored.rows, [0, 1, 3, 4])

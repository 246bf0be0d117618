"""OnnxPredictor in real Ray Data pipelines: same outputs as pipeline.score, bad rows, dead letters."""

from __future__ import annotations

import os
from pathlib import Path

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.demo.tabular import feature_names, make_scoring_table

pytestmark = pytest.mark.usefixtures("ray_cluster")

# Rows made bad in the tabular table, and what makes them bad.
NULL_ROWS = (3, 41, 97)
TEXT_ROWS = (10, 64)


def ray_data():
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray.data


def blocks(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def collect(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")


def predict(table: pa.Table, batch_format: str = "pyarrow", **kwargs) -> pa.Table:
    """Score ``table`` in 40-row blocks with two 1-CPU actors (``concurrency=2`` before Ray 2.51)."""
    data = ray_data()
    ds = data.from_arrow(blocks(table, 40)).map_batches(
        pipeline.OnnxPredictor, fn_constructor_kwargs=kwargs, batch_format=batch_format,
        batch_size=40, compute=data.ActorPoolStrategy(size=2), num_cpus=1)
    return collect(ds)


def matrix(column: pa.ChunkedArray) -> np.ndarray:
    return np.array(column.to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def dirty_table() -> pa.Table:
    """150 patients; some rows have a null feature, some a non-numeric one."""
    table = make_scoring_table(150, seed=5)
    radius = table["mean_radius"].to_pylist()
    for i in NULL_ROWS:
        radius[i] = None
    texture = [f"{v:.6f}" for v in table["mean_texture"].to_pylist()]
    for i in TEXT_ROWS:
        texture[i] = "n/a"
    names = table.column_names
    table = table.set_column(names.index("mean_radius"), "mean_radius", pa.array(radius, pa.float64()))
    return table.set_column(names.index("mean_texture"), "mean_texture", pa.array(texture, pa.string()))


def test_embeds_every_row_once_like_score(text_rows, minilm_dir):
    # The 200 shortest of the session's texts (a few words each): quick on 2 cores.
    texts = sorted(text_rows, key=len)[:200]
    table = pa.table({"id": pa.array(range(200), pa.int64()), "text": texts})
    out = predict(table, model=str(minilm_dir), task="embed")
    assert out.column_names == ["id", "text", "embedding", "_error"]
    assert out["id"].to_pylist() == list(range(200))
    assert out["_error"].null_count == 200
    want = matrix(pipeline.score(table, model=str(minilm_dir))["embedding"])
    got = matrix(out["embedding"])
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999


def test_bad_feature_rows_get_error_and_good_rows_match_score(dirty_table, breast_cancer_dir):
    out = predict(dirty_table, model=str(breast_cancer_dir), passthrough=["id"])
    assert out.column_names == ["id", "label", "score", "probabilities", "_error"]
    errors = dict(enumerate(out["_error"].to_pylist()))
    bad = {i for i, e in errors.items() if e is not None}
    assert bad == {*NULL_ROWS, *TEXT_ROWS}
    assert all("mean_radius" in errors[i] for i in NULL_ROWS)
    assert all("mean_texture" in errors[i] and "'n/a'" in errors[i] for i in TEXT_ROWS)
    assert all(out["probabilities"][i].as_py() is None for i in bad)
    reference = pipeline.score(dirty_table, model=str(breast_cancer_dir), passthrough=["id"])
    assert out["_error"].to_pylist() == reference["_error"].to_pylist()
    good = [i for i in range(dirty_table.num_rows) if i not in bad]
    np.testing.assert_array_equal(matrix(out["probabilities"].take(good)),
                                  matrix(reference["probabilities"].take(good)))
    assert out["label"].to_pylist() == reference["label"].to_pylist()


def dead_letters(folder: Path) -> pa.Table:
    files = sorted(folder.glob("bad-*.parquet"))
    assert files, f"no dead-letter files in {folder}"
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")


def test_drop_writes_bad_rows_to_dead_letter_once(dirty_table, breast_cancer_dir, tmp_path):
    folder = tmp_path / "dead"
    kwargs = {"model": str(breast_cancer_dir), "passthrough": ["id"], "on_bad_row": "drop",
              "dead_letter_uri": f"file://{folder}"}
    out = predict(dirty_table, **kwargs)
    bad = sorted({*NULL_ROWS, *TEXT_ROWS})
    assert "_error" not in out.column_names
    assert out["id"].to_pylist() == [i for i in range(dirty_table.num_rows) if i not in bad]
    dead = dead_letters(folder)
    assert dead["id"].to_pylist() == bad
    assert set(dead.column_names) == {"id", *feature_names(), "_reason"}
    reasons = dict(zip(dead["id"].to_pylist(), dead["_reason"].to_pylist(), strict=True))
    assert all("mean_radius" in reasons[i] for i in NULL_ROWS)
    assert all("'n/a'" in reasons[i] for i in TEXT_ROWS)
    # Running the same batches again (as a retry does) overwrites the files, never adds to them.
    files = sorted(p.name for p in folder.iterdir())
    predict(dirty_table, **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == files
    assert dead_letters(folder)["id"].to_pylist() == bad


def test_model_and_dead_letters_on_s3(dirty_table, breast_cancer_dir, s3_options, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(breast_cancer_dir) + "/", f"{s3_bucket}/models/bc/", recursive=True)
    predictor = pipeline.OnnxPredictor(f"s3://{s3_bucket}/models/bc", passthrough=["id"],
                                       on_bad_row="drop", dead_letter_uri=f"s3://{s3_bucket}/dead/",
                                       storage_options=s3_options)
    assert predictor.model.bundle.path != breast_cancer_dir  # fetched into the node's cache
    out = predictor(dirty_table)
    assert out.num_rows == dirty_table.num_rows - len(NULL_ROWS) - len(TEXT_ROWS)
    predictor(dirty_table)  # the same batch again overwrites its file
    files = fs.ls(f"{s3_bucket}/dead", detail=False)
    assert len(files) == 1 and files[0].rsplit("/", 1)[-1].startswith("bad-")
    dead = pq.read_table(files[0], filesystem=fs)
    assert dead["id"].to_pylist() == sorted({*NULL_ROWS, *TEXT_ROWS})


def test_pandas_batches(dirty_table, breast_cancer_dir):
    out = predict(dirty_table, "pandas", model=str(breast_cancer_dir), passthrough=["id"])
    arrow = predict(dirty_table, model=str(breast_cancer_dir), passthrough=["id"])
    assert out.schema.remove_metadata().equals(arrow.schema.remove_metadata())
    assert out.replace_schema_metadata(None).equals(arrow.replace_schema_metadata(None))


def test_numpy_batches_in_process(breast_cancer_dir):
    table = make_scoring_table(6)
    batch = {name: table[name].to_numpy() for name in table.column_names}
    batch["mean_radius"] = batch["mean_radius"].copy()
    batch["mean_radius"][2] = np.nan
    out = pipeline.OnnxPredictor(str(breast_cancer_dir), passthrough=["id"])(batch)
    assert list(out) == ["id", "label", "score", "probabilities", "_error"]
    assert out["probabilities"].shape == (6, 2)
    probabilities = out["probabilities"]
    assert np.isnan(probabilities[2]).all() and not np.isnan(np.delete(probabilities, 2, 0)).any()
    assert [e is not None for e in out["_error"]] == [False, False, True, False, False, False]


def test_pickles_by_arguments_not_session(breast_cancer_dir):
    assert cloudpickle.loads(cloudpickle.dumps(pipeline.OnnxPredictor)) is pipeline.OnnxPredictor
    predictor = pipeline.OnnxPredictor(str(breast_cancer_dir), "classify", passthrough=["id"])
    data = cloudpickle.dumps(predictor)
    assert len(data) < 2000  # arguments only: no session, no model bytes
    table = make_scoring_table(20)
    assert cloudpickle.loads(data)(table).equals(predictor(table))


def test_bad_arguments_fail_early(breast_cancer_dir):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="on_bad_row"):
        pipeline.OnnxPredictor(str(breast_cancer_dir), on_bad_row="skip")
    with pytest.raises(ConfigError, match="providers"):
        pipeline.OnnxPredictor(str(breast_cancer_dir), providers=("gpu",))
    with pytest.raises(ConfigError, match=r"task\.kind"):
        pipeline.OnnxPredictor(str(breast_cancer_dir), task="embed")


def test_relative_paths_are_refused_inside_ray_workers(breast_cancer_dir):
    import ray

    @ray.remote(num_cpus=1)
    def construct(model: str) -> str:
        return pipeline.OnnxPredictor(model).provider

    relative = os.path.relpath(breast_cancer_dir)
    assert ray.get(construct.remote(str(breast_cancer_dir))) == "cpu"
    with pytest.raises(Exception, match=r"relative path.*absolute path or a URL"):
        ray.get(construct.remote(relative))

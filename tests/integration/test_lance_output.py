"""Lance output through whole jobs: one dataset version per run, the driver killed around the
commit, a vector index over embeddings on the moto S3 endpoint (real lance, real Ray)."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pytest

import pipeline
from pipeline.layout import OutputLayout
from pipeline.runs import read_runs
from pipeline.sinks.object_store import object_store_options
from tests.support.fixtures import write_text_parquet
from tests.support.jobs import from_scratch, rows_of, run_driver, write_scoring_file
from tests.support.jobs import tabular_job as job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_lance_versions_per_run_and_crash_around_commit(models_dir: Path, tmp_path: Path) -> None:
    data, out, scratch = tmp_path / "in", tmp_path / "out", tmp_path / "scratch"
    write_scoring_file(data, "a.parquet", 60, seed=51, start_id=0)
    write_scoring_file(data, "b.parquet", 8, seed=52, start_id=1000)
    spec = job(models_dir, data, out, format="lance")

    first = pipeline.run_job(spec, progress=False)
    assert first.ok
    v1 = first.report["run"]["table"]["version"]
    run1 = from_scratch(models_dir, data, scratch)
    assert rows_of(lance.dataset(str(out)).to_table()) == run1 == rows_of(first.read())

    # Run 2 is killed after its last shard, before the commit: readers still see run 1.
    write_scoring_file(data, "b.parquet", 10, seed=53, start_id=1000)
    write_scoring_file(data, "c.parquet", 50, seed=54, start_id=2000)
    killed = run_driver(spec, tmp_path, [{"point": "driver.before_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert lance.dataset(str(out)).version == v1
    assert rows_of(lance.dataset(str(out)).to_table()) == run1
    assert read_runs(OutputLayout(str(out))).open["run"] == 2

    resumed = pipeline.run_job(spec, progress=False)
    assert resumed.ok and resumed.report["totals"]["run_now"] == 0
    assert lance.dataset(str(out)).version == v1 + 1  # exactly one new version
    run2 = from_scratch(models_dir, data, scratch)
    assert rows_of(lance.dataset(str(out)).to_table()) == run2
    assert rows_of(lance.dataset(str(out), version=v1).to_table()) == run1

    # Killed after the commit: the rerun finds the fragments committed and adds no version.
    (data / "a.parquet").unlink()
    killed = run_driver(spec, tmp_path, [{"point": "driver.after_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert lance.dataset(str(out)).version == v1 + 2
    again = pipeline.run_job(spec, progress=False)
    assert again.ok and again.report["run"]["run"] == 3 and again.report["run"]["status"] == "complete"
    assert lance.dataset(str(out)).version == v1 + 2
    assert rows_of(lance.dataset(str(out)).to_table()) == from_scratch(models_dir, data, scratch)

    # Run 4 killed after its commit, the input changed again before the rerun: the resumed
    # run commits the difference as well.
    write_scoring_file(data, "d.parquet", 20, seed=55, start_id=3000)
    killed = run_driver(spec, tmp_path, [{"point": "driver.after_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    write_scoring_file(data, "e.parquet", 20, seed=56, start_id=4000)
    fourth = pipeline.run_job(spec, progress=False)
    assert fourth.ok and fourth.report["run"]["run"] == 4
    assert lance.dataset(str(out)).version == v1 + 4
    assert rows_of(lance.dataset(str(out)).to_table()) == from_scratch(models_dir, data, scratch)


def test_lance_embeddings_with_vector_index_on_s3(minilm_dir: Path, text_rows: list[str],
                                                  tmp_path: Path, s3_bucket: str,
                                                  s3_options: dict) -> None:
    data = tmp_path / "in"
    write_text_parquet(data / "a.parquet", text_rows[:300], start_id=0)
    uri = f"s3://{s3_bucket}/vectors"
    spec = {
        "name": "lance-index",
        "input": {"uri": str(data)},
        "model": {"uri": str(minilm_dir)},
        "task": {"kind": "embed", "text_column": "text"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 100},
        "workers": {"cpu": {"replicas": 2, "cpus": 1}},
        "output": {"uri": uri, "format": "lance", "mode": "incremental",
                   "storage_options": s3_options,
                   "index": {"metric": "cosine", "type": "IVF_PQ", "num_partitions": 2,
                             "num_sub_vectors": 8}},
    }
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    index = result.report["run"]["table"]["index"]
    assert index["built"] is True, index
    ds = lance.dataset(uri, storage_options=object_store_options(uri, s3_options))
    assert ds.count_rows() == 300
    indices = ds.describe_indices()
    assert len(indices) == 1 and indices[0].num_rows_indexed == 300
    table = ds.to_table(columns=["id", "embedding"])
    ids = table["id"].to_pylist()
    assert sorted(ids) == list(range(300))
    # The nearest neighbour of a stored vector (cosine) is the row itself.
    row = ids.index(123)
    query = np.asarray(table["embedding"][row].values, dtype=np.float32)
    hits = ds.to_table(nearest={"column": "embedding", "q": query, "k": 1, "metric": "cosine"},
                       columns=["id"])
    assert hits["id"].to_pylist() == [123]

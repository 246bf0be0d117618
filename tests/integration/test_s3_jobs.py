"""The same jobs with input, model and output on S3 (a real moto server through s3fs)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

import pipeline
from pipeline.demo.tabular import feature_names, make_scoring_table, train

pytestmark = pytest.mark.usefixtures("ray_cluster")


def put_table(fs: s3fs.S3FileSystem, path: str, table, row_group_size: int = 100) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    fs.pipe(path, buf.getvalue())


def test_classify_job_round_trip_on_s3(s3_options, s3_bucket, breast_cancer_dir, tmp_path,
                                       monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(breast_cancer_dir) + "/", f"{s3_bucket}/models/bc/", recursive=True)
    tables = [make_scoring_table(300, seed=1, start_id=0), make_scoring_table(120, seed=2,
                                                                              start_id=300)]
    for i, table in enumerate(tables):
        put_table(fs, f"{s3_bucket}/in/patients-{i}.parquet", table)

    job = {
        "input": {"uri": f"s3://{s3_bucket}/in", "storage_options": s3_options},
        "model": {"uri": f"s3://{s3_bucket}/models/bc", "storage_options": s3_options},
        "task": {"kind": "classify"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 100},
        "workers": {"cpu": {"replicas": 2}},
        "output": {"uri": f"s3://{s3_bucket}/out", "storage_options": s3_options},
    }
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    fs.invalidate_cache()
    assert fs.exists(f"{s3_bucket}/out/_SUCCESS")
    report = json.loads(fs.cat(f"{s3_bucket}/out/_pipeline/report.json"))
    assert report["totals"]["shards"] == 5 and report["totals"]["rows_out"] == 420
    job_doc = json.loads(fs.cat(f"{s3_bucket}/out/_pipeline/job.json"))
    assert job_doc["spec"]["input"]["storage_options"]["secret"] == "***"

    out = result.read().sort_by("id")
    assert out["id"].to_pylist() == list(range(420))
    estimator = train()[0]
    features = np.concatenate([t.select(feature_names()).to_pandas().to_numpy() for t in tables])
    want = estimator.predict_proba(features)
    got = np.array(out["probabilities"].to_pylist())
    assert np.abs(got - want).max() < 1e-5
    # The model came through the node cache, keyed by the bundle's identity.
    assert (tmp_path / "cache" / "bundles" / report["bundle_identity"] / ".complete").exists()


def test_embed_job_on_s3_with_env_credentials(s3_options, s3_bucket, minilm_dir, text_rows,
                                              monkeypatch):
    fs = s3fs.S3FileSystem(**s3_options)
    import pyarrow as pa

    table = pa.table({"id": pa.array(range(120), pa.int64()), "text": text_rows[:120]})
    put_table(fs, f"{s3_bucket}/docs/a.parquet", table, row_group_size=40)
    monkeypatch.setenv("TEST_S3_SECRET", s3_options["secret"])
    options = {**s3_options, "secret": "${TEST_S3_SECRET}"}
    job = {
        "input": {"uri": f"s3://{s3_bucket}/docs/*.parquet", "storage_options": options},
        "model": {"uri": str(minilm_dir)},
        "task": {"kind": "embed"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 40},
        "workers": {"cpu": {"replicas": 2}},
        "output": {"uri": f"s3://{s3_bucket}/emb", "storage_options": options},
    }
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    out = result.read()
    assert sorted(out["id"].to_pylist()) == list(range(120))
    assert out.schema.field("embedding").type.list_size == 384
    assert "secret" not in json.dumps(result.report.to_dict()).lower() or \
        s3_options["secret"] not in json.dumps(result.report.to_dict())


def test_failed_upload_never_replaces_a_good_object(s3_options, s3_bucket):
    from pipeline import storage

    fs = s3fs.S3FileSystem(**s3_options)
    path = f"{s3_bucket}/out/part-1.parquet"
    fs.pipe(path, b"good")
    with pytest.raises(RuntimeError), storage.atomic_writer(fs, path) as fh:
        fh.write(b"half")
        raise RuntimeError("upload chunk failed")
    fs.invalidate_cache()
    assert fs.cat(path) == b"good"

"""Submission as the README documents it, on a real two-node cluster on this machine.

`ray start --head` plus `ray start --address` (each node with its own agent ports), storage on
the moto S3 endpoint that both nodes reach through the standard AWS_* environment, the embed
job submitted with `ray job submit --working-dir .` and with `python -m pipeline.submit`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import REPO_ROOT
from tests.support.fixtures import S3_KEY, S3_SECRET
from tests.support.ray_cli_cluster import LocalRayCluster

ROWS = 480
ROWS_PER_SHARD = 40


@pytest.fixture(scope="module")
def s3_env(s3_server: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def bucket(s3_options: dict, minilm_dir, text_rows, tmp_path_factory) -> str:
    fs = s3fs.S3FileSystem(**s3_options)
    name = "two-nodes"
    fs.mkdir(name)
    fs.put(str(minilm_dir) + "/", f"{name}/models/minilm/", recursive=True)
    texts = (text_rows * 2)[:ROWS]
    table = pa.table({"id": pa.array(range(ROWS), pa.int64()), "text": texts})
    local = tmp_path_factory.mktemp("docs") / "docs.parquet"
    pq.write_table(table, local, row_group_size=ROWS_PER_SHARD)
    fs.put(str(local), f"{name}/docs/docs.parquet")
    return name


@pytest.fixture(scope="module")
def cluster(s3_env, tmp_path_factory):
    cache = tmp_path_factory.mktemp("node-caches")
    ray_cluster = LocalRayCluster(s3_env)
    try:
        # One CPU each: `replicas: auto` gives one actor per node, spread over both.
        ray_cluster.start_head(1, env={"PIPELINE_CACHE_DIR": str(cache / "head")})
        ray_cluster.add_node(1, env={"PIPELINE_CACHE_DIR": str(cache / "worker")})
        ray_cluster.wait_for_nodes(2)
        yield ray_cluster
    finally:
        ray_cluster.stop()
    assert not ray_cluster.processes()


def sets(bucket: str, out: str, **more: str) -> list[str]:
    values = {"input.uri": f"s3://{bucket}/docs/", "model.uri": f"s3://{bucket}/models/minilm",
              "output.uri": f"s3://{bucket}/{out}", "sharding.rows_per_shard": str(ROWS_PER_SHARD),
              **more}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def both_nodes_take_shards(folder) -> str:
    """A fault rule that holds each worker's first shards until the worker of the other node
    has one too: without it the first worker up could finish this small job alone."""
    return json.dumps([{"point": "worker.start", "action": "barrier", "dir": str(folder),
                        "parties": 2, "timeout_s": 120}])


def committed(fs: s3fs.S3FileSystem, output: str) -> tuple[list[int], list[dict], dict]:
    fs.invalidate_cache()
    markers = [json.loads(fs.cat(p)) for p in fs.glob(f"{output}/_pipeline/shards/*.json")]
    ids: list[int] = []
    for marker in markers:
        with fs.open(f"{output}/{marker['part']}", "rb") as fh:
            ids += pq.read_table(fh, columns=["id"])["id"].to_pylist()
    report = json.loads(fs.cat(f"{output}/_pipeline/report.json"))
    return ids, markers, report


def check_spread_exactly_once(fs: s3fs.S3FileSystem, output: str) -> dict:
    ids, markers, report = committed(fs, output)
    assert sorted(ids) == list(range(ROWS))  # every row, exactly once
    assert fs.exists(f"{output}/_SUCCESS")
    nodes = {m["node_id"] for m in markers}
    assert len(nodes) == 2, f"shards ran on {len(nodes)} node(s): {nodes}"
    assert {n["node_id"] for n in report["nodes"]} == nodes
    assert sum(n["rows"] for n in report["nodes"]) == ROWS
    assert all(n["shards"] >= 1 and n["workers"] == 1 for n in report["nodes"])
    return report


def test_ray_job_submit_as_the_readme_says(cluster, bucket, s3_options, tmp_path):
    faults = {"env_vars": {"PIPELINE_FAULTS": both_nodes_take_shards(tmp_path / "barrier")}}
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
           "--runtime-env-json", json.dumps(faults), "--",
           "python", "-m", "pipeline.run", "jobs/embed-cluster.yaml", "--no-progress",
           *sets(bucket, "out/readme")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "SUCCEEDED: 480 rows" in proc.stdout
    check_spread_exactly_once(s3fs.S3FileSystem(**s3_options), f"{bucket}/out/readme")
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # the rule reached both workers


def test_submit_helper_ships_a_local_bundle_and_returns_the_exit_code(cluster, bucket,
                                                                      s3_options, tmp_path):
    # The bundle is on this machine only (models/ is git-ignored, so --working-dir skips it):
    # the helper sends a copy, and the job's driver ships it to the other node.
    cmd = [sys.executable, "-m", "pipeline.submit", "jobs/embed-cluster.yaml",
           "--address", cluster.dashboard_url, "--env", "PIPELINE_FAULTS",
           *sets(bucket, "out/helper", **{"model.uri": "models/minilm"})]
    env = {**cluster.env, "PIPELINE_FAULTS": both_nodes_take_shards(tmp_path / "barrier")}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.startswith("submitted ")
    fs = s3fs.S3FileSystem(**s3_options)
    check_spread_exactly_once(fs, f"{bucket}/out/helper")
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # --env carried the rule through
    job = json.loads(fs.cat(f"{bucket}/out/helper/_pipeline/job.json"))
    assert job["spec"]["model"]["uri"].startswith("file:///")  # resolved on the driver

    # The same job again: everything is committed, so it resumes and computes nothing.
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stdout[-3000:]
    report = json.loads(fs.cat(f"{bucket}/out/helper/_pipeline/report.json"))
    assert report["totals"]["run_now"] == 0 and report["totals"]["resumed"] == ROWS // ROWS_PER_SHARD


def test_node_local_paths_fail_at_plan_time_naming_the_key(cluster, bucket, s3_options,
                                                           tmp_path):
    # The helper refuses before sending anything.
    helper = subprocess.run(
        [sys.executable, "-m", "pipeline.submit", "jobs/embed-cluster.yaml", "--address",
         cluster.dashboard_url, *sets(bucket, "out/local", **{"input.uri": str(tmp_path)})],
        cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert helper.returncode == 2
    assert helper.stderr.strip().splitlines() == [
        f"error: input.uri: {tmp_path} is a path on this machine, which the cluster's "
        "nodes do not see; use object storage (s3://, gs://, ...) or, for a filesystem every "
        "node mounts, an absolute path with storage.shared_filesystem: true"]

    # Submitted by hand, the job's driver refuses it at plan time: exit 2, one line, no output.
    proc = subprocess.run(
        ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".", "--",
         "python", "-m", "pipeline.run", "jobs/embed-cluster.yaml", "--no-progress",
         *sets(bucket, "out/local", **{"output.uri": "out/cluster-local"})],
        cwd=REPO_ROOT, env=cluster.env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "failed with exit code 2" in proc.stdout
    # `ray job submit` echoes the driver's log twice (the tail, then the failure summary).
    errors = list(dict.fromkeys(ln for ln in proc.stdout.splitlines() if ln.startswith("error: ")))
    assert len(errors) == 1, proc.stdout[-3000:]
    assert errors[0].startswith("error: output.uri: file:///")
    assert "is a path on this machine, but the Ray cluster has 2 nodes" in errors[0]
    assert "Traceback" not in proc.stdout
    fs = s3fs.S3FileSystem(**s3_options)
    assert not fs.exists(f"{bucket}/out/local")

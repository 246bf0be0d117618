"""Elastic pools on an autoscaling cluster: the job starts with no worker node, asks the
autoscaler for resources, uses the nodes that join, and finishes exactly once.

The cluster is Ray's fake multi-node autoscaler on this machine (`ray start --head
--autoscaling-config` with RAY_FAKE_CLUSTER=1): a head of 0 CPUs, and 1-CPU nodes that the
autoscaler starts as processes when there is demand.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.reliability.harness import tabular_job, write_tabular_input
from tests.support.ray_cli_cluster import LocalRayCluster

ROWS = 600


@pytest.fixture(scope="module")
def autoscaling_cluster():
    cluster = LocalRayCluster()
    try:
        cluster.start_autoscaling_head(worker_cpus=1, max_workers=2)
        cluster.wait_for_nodes(1)
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.processes()


def test_job_grows_onto_nodes_the_autoscaler_adds(autoscaling_cluster, tmp_path):
    before = autoscaling_cluster.alive_nodes()
    assert list(before.values()) == [True]  # only the head, which has no CPU
    ids = write_tabular_input(tmp_path / "in", ROWS, files=2, seed=5)
    job = tabular_job(str(tmp_path / "in"), str(tmp_path / "out"),
                      # All fake nodes share this machine's disk.
                      storage={"shared_filesystem": True})
    job["workers"] = {"cpu": {"replicas": "auto", "max_replicas": 2}, "start_timeout_s": 120}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**autoscaling_cluster.env,
           # The first worker's shards wait for the second node's worker (or 150 s), so the
           # job outlives the start of the second node however long the autoscaler takes.
           "PIPELINE_FAULTS": json.dumps([{"point": "worker.start", "action": "barrier",
                                           "dir": str(tmp_path / "barrier"), "parties": 2,
                                           "timeout_s": 150}])}
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", str(job_file), "--no-progress",
                           "--address", autoscaling_cluster.gcs_address],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "out"
    markers = [json.loads(p.read_text()) for p in (out / "_pipeline" / "shards").glob("*.json")]
    got = [i for m in markers for i in pq.read_table(out / m["part"], columns=["id"])["id"].to_pylist()]
    assert sorted(got) == sorted(ids)  # every row exactly once
    report = json.loads((out / "_pipeline" / "report.json").read_text())
    nodes = {m["node_id"] for m in markers}
    assert not nodes & set(before)
    # Both nodes the autoscaler started took shards, and the report says so.
    assert len(nodes) == 2, report["nodes"]
    assert {n["node_id"] for n in report["nodes"]} == nodes
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # one worker per node met there
    assert report["totals"]["rows_in"] == ROWS and report["status"] == "succeeded"

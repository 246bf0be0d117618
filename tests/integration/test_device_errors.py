"""A CUDA error in one shard's first attempt, through a real Ray job: the shard is retried on
another worker, the broken worker is replaced, nothing is dead-lettered, the job exits 0."""

from __future__ import annotations

import json

import pytest

import pipeline
from tests.reliability import harness

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_cuda_error_in_one_shard_retries_it_without_dead_letters(tmp_path, monkeypatch):
    ids = harness.write_tabular_input(tmp_path / "in", 400, 3, seed=11)
    fired = tmp_path / "fired"
    # The first shard to reach inference fails every run with "CUDA failure 700: ...".
    monkeypatch.setenv("PIPELINE_FAULTS", json.dumps([
        {"point": "worker.start", "action": "sleep", "seconds": 0.05},
        {"point": "worker.infer", "action": "device", "attempt": 1, "once_file": str(fired)}]))
    result = pipeline.run_job(harness.tabular_job(str(tmp_path / "in"), str(tmp_path / "out")),
                              progress=False)
    monkeypatch.delenv("PIPELINE_FAULTS")
    a = harness.audit(str(tmp_path / "out"), ids)
    report = result.report
    assert fired.exists()
    assert result.exit_code == 0, report["failures"]
    assert a["lost"] == 0 and a["duplicated"] == 0 and a["consistent"], a
    assert a["dead_ids"] == set() and report["totals"]["rows_bad"] == 0
    assert (tmp_path / "out" / "_SUCCESS").exists()

    retried = report["attempts"]["retried_shards"]
    injected = [r for r in retried if "CUDA failure 700: an illegal memory access" in r["errors"][0]]
    assert len(injected) == 1, retried
    sid = injected[0]["shard"]
    assert injected[0]["error_types"][0] == "DeviceError"
    assert a["markers"][sid]["attempt"] == 2  # retried once, on another worker, and committed

    # These need the worker.py change. The worker whose session broke exits (its other
    # in-flight shard is requeued as a worker loss) instead of failing every shard it takes
    # with "the session broke on an earlier shard" until their attempts run out; markers carry
    # the provider read back after the shard and the probes run.
    assert report["attempts"]["actor_deaths"] >= 1
    assert [r["shard"] for r in retried if "DeviceError" in r["error_types"]] == [sid]
    assert all(m["provider_after"] == "cpu" and m["probes"] == 0 for m in a["markers"].values())
    # Needs the report.py change: device errors counted in report.json.
    assert report["attempts"]["device_errors"] == 1

"""One driver per output, with real driver processes (``python -m pipeline.run``) on the test
session's Ray cluster, on local disk and on the S3 endpoint: a second driver is refused in
one line; a driver that stops renewing is taken over once its lease expires, and learns it
lost the lease when it wakes, committing nothing more; the output is exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.layout import LEASE_FILE, OutputLayout
from pipeline.state import LeaseRecord
from tests.reliability.harness import audit, tabular_job, write_tabular_input
from tests.support.jobs import REPO

pytestmark = pytest.mark.usefixtures("ray_cluster")
TIMEOUT_S = 6.0


def driver(job: dict, work: Path, name: str, *flags: str,
           seconds_per_shard: float = 0.0) -> subprocess.Popen:
    """``python -m pipeline.run`` as its own process; its workers take ``seconds_per_shard``
    longer per shard, so that it is still running when the test acts on it."""
    import ray

    path = work / f"{name}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PIPELINE_FAULTS": json.dumps([{"point": "worker.start", "action": "sleep",
                                           "seconds": seconds_per_shard}])}
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", str(path), "--no-progress",
                             *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lease_of(layout: OutputLayout) -> LeaseRecord | None:
    path = layout.pipeline_path(LEASE_FILE)
    layout.fs.invalidate_cache()
    try:  # one GET: an open() (HEAD, then GET If-Match) races the holder's renewals
        return LeaseRecord.model_validate_json(layout.fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def committed(layout: OutputLayout) -> int:
    layout.fs.invalidate_cache()
    return len(layout.committed_shards())


def test_second_driver_refused_then_takes_over_a_stopped_one_exactly_once(
        tmp_path, s3_bucket, s3_options):
    """On the S3 endpoint (conditional PUTs); the same on local disk is the next test's."""
    uri, options = f"s3://{s3_bucket}/out", s3_options
    ids = write_tabular_input(tmp_path / "in", 800, 2, seed=81)
    job = tabular_job(str(tmp_path / "in"), uri)
    job["output"]["lease_timeout_s"] = TIMEOUT_S
    layout = OutputLayout(uri, options)
    if options:
        job["output"]["storage_options"] = options

    first = driver(job, tmp_path, "first", seconds_per_shard=2.0)
    wait_for(lambda: committed(layout) >= 1 or first.poll() is not None, "a first commit")
    assert first.poll() is None, first.communicate()[0][-2000:]
    holder = lease_of(layout)
    assert holder is not None and holder.pid == first.pid and holder.ray_job_id

    refused = driver(job, tmp_path, "refused")
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2, out[-2000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "held by another driver" in line and f"pid {first.pid}" in line
    assert "--wait" in line

    # The first driver stops renewing (SIGSTOP): the second waits for its lease to expire.
    os.kill(first.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    second = driver(job, tmp_path, "second", "--wait")
    wait_for(lambda: (lease := lease_of(layout)) is not None and lease.pid == second.pid,
             "the takeover")
    # Not before it expired: the last renewal was at most a quarter of the timeout before
    # the stop, and the new holder saw it that old.
    assert time.monotonic() - stopped_at >= TIMEOUT_S * 0.75 - 0.1
    took_over = lease_of(layout).took_over
    assert f"pid {first.pid}" in took_over
    assert int(re.search(r"last renewed (\d+) s ago", took_over).group(1)) >= TIMEOUT_S
    os.kill(first.pid, signal.SIGCONT)  # wakes up to find the lease gone

    out_second, _ = second.communicate(timeout=300)
    out_first, _ = first.communicate(timeout=120)
    assert second.returncode == 0, out_second[-2000:]
    assert first.returncode == 1, out_first[-2000:]
    assert "taken over" in out_first and "without committing" in out_first
    assert "waiting for the lease" in out_second
    result = audit(uri, ids, options)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["consistent"]
    assert layout.fs.exists(layout._path("_SUCCESS"))
    assert lease_of(layout) is None  # given back at the end


def test_a_killed_driver_is_taken_over_at_once_on_the_same_machine(tmp_path):
    """On local disk (flock): refused while it runs; once it is killed, a rerun on the same
    machine sees its process is gone and takes over without waiting for the timeout."""
    ids = write_tabular_input(tmp_path / "in", 400, 2, seed=82)
    job = tabular_job(str(tmp_path / "in"), str(tmp_path / "out"))
    job["output"]["lease_timeout_s"] = 600  # only the dead process lets the rerun in
    layout = OutputLayout(str(tmp_path / "out"))
    first = driver(job, tmp_path, "first", seconds_per_shard=3.0)
    wait_for(lambda: committed(layout) >= 1 or first.poll() is not None, "a first commit")
    refused = driver(job, tmp_path, "refused")
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and f"pid {first.pid}" in out, out[-2000:]
    assert first.poll() is None
    first.kill()
    first.wait()
    assert lease_of(layout).pid == first.pid
    rerun = driver(job, tmp_path, "rerun")
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-2000:]
    result = audit(str(tmp_path / "out"), ids)
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["consistent"]
    report = json.loads((tmp_path / "out" / "_pipeline" / "report.json").read_text())
    assert report["totals"]["resumed"] >= 1

"""Fault injection, small: each fault once. `make chaos` runs more trials at larger size.

Every trial checks the exit code, that output ids equal input ids minus dead-lettered ids
with no duplicates, that recomputed shards are at most those in flight at the fault, and
that report.json agrees with the files.
"""

from __future__ import annotations

import pytest

from tests.reliability import harness

pytestmark = pytest.mark.usefixtures("ray_cluster")
ROWS = 400


def check(trial: harness.Trial) -> None:
    assert trial.exit_code == trial.expected_exit, trial
    assert trial.rows_lost == 0, trial
    assert trial.rows_duplicated == 0, trial
    assert trial.shards_recomputed <= trial.recompute_bound, trial
    assert trial.report_consistent, trial


def test_worker_sigkill_mid_shard(tmp_path):
    trial = harness.worker_kill(tmp_path, ROWS, seed=1)
    check(trial)
    assert trial.details["fired"] and trial.details["deaths"] >= 1
    assert trial.shards_recomputed >= 1  # the killed shard really ran twice


def test_s3_throttling_and_resets(tmp_path, s3_server, s3_options):
    trial = harness.s3_faults(tmp_path, ROWS, seed=2, s3_url=s3_server, options=s3_options,
                              fault_rate=0.25)
    check(trial)
    proxy = trial.details["proxy"]
    assert proxy["requests"] > 20
    assert proxy["slowdown"] + proxy["reset"] >= 3  # faults really reached the clients


def test_corrupt_parquet_among_good_files(tmp_path):
    trial = harness.corrupt_file(tmp_path, ROWS, seed=3)
    check(trial)
    assert trial.details["failed_inputs"] == ["part-001.parquet"]
    assert not trial.details["success"]


def test_input_deleted_between_planning_and_reading(tmp_path):
    trial = harness.deleted_file(tmp_path, ROWS, seed=4)
    check(trial)
    assert trial.details["failed"] >= 1
    assert "part-002.parquet" in trial.details["errors"][0]
    assert "file not found" in trial.details["errors"][0]


def test_bad_rows_go_to_dead_letters(tmp_path):
    trial = harness.bad_rows(tmp_path, 200, seed=5)
    check(trial)
    reasons = trial.details["reasons"]
    assert any("column text has type int64" in r for r in reasons)
    assert any(r in ("text is null", "text is empty") for r in reasons)
    assert trial.details["strict_exit"] == 1


def test_driver_sigkill_then_rerun(tmp_path):
    trial = harness.driver_kill(tmp_path, ROWS, seed=6)
    check(trial)


def test_node_removed_mid_job(tmp_path):
    trial = harness.node_loss(tmp_path, ROWS, seed=7)
    check(trial)
    assert trial.details["deaths"] >= 1


def test_rows_that_abort_the_worker_are_isolated_and_dead_lettered(tmp_path):
    trial = harness.poison_rows(tmp_path, 400, seed=8, action="abort", rows_per_shard=16)
    check(trial)
    assert trial.details["dead"] == trial.details["poison"] and trial.details["deaths"] >= 3
    [reason] = trial.details["reasons"]
    assert reason.startswith("worker process died on this row (")


def test_rows_that_exhaust_memory_are_isolated_and_dead_lettered(tmp_path):
    trial = harness.poison_rows(tmp_path, 400, seed=9, action="oom", rows_per_shard=16)
    check(trial)
    assert trial.details["dead"] == trial.details["poison"]
    [reason] = trial.details["reasons"]
    assert reason.startswith("too large for this worker (out of memory: Unable to allocate")

"""Fault trials with tables in and out, small: each once. `make chaos` runs more trials.

Every trial checks the exit code, that the output table holds every row of the input version
exactly once with the values a fresh scoring gives, that nothing was recomputed beyond what
the fault was in flight on, and the trial's own evidence that the fault happened."""

from __future__ import annotations

import pytest

from tests.reliability import table_faults
from tests.reliability.test_faults import check

pytestmark = pytest.mark.usefixtures("ray_cluster")
ROWS = 150


def test_merge_replayed_after_a_driver_kill(tmp_path):
    # Killed after the merge commit, before the run manifest says so (seed 0); make chaos
    # alternates with a kill just before the commit.
    trial = table_faults.merge_commit_kill(tmp_path, ROWS, seed=0)
    check(trial)
    assert trial.details["killed"] == -9


def test_worker_killed_with_table_input_and_output(tmp_path):
    trial = table_faults.table_worker_kill(tmp_path, ROWS, seed=2)
    check(trial)
    assert trial.details["deaths"] >= 1


@pytest.mark.parametrize("seed", [0, 1])  # a Delta output, an Iceberg output
def test_second_writer_commits_to_the_output_table_meanwhile(tmp_path, seed):
    trial = table_faults.second_writer(tmp_path, ROWS, seed)
    check(trial)
    assert trial.details["foreign_kept"]


def test_input_table_moving_on_changes_nothing_the_job_reads(tmp_path):
    trial = table_faults.input_moves_on(tmp_path, ROWS, seed=3)
    check(trial)
    assert trial.details["moved_during_job"]

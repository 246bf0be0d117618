"""The output lease on real storage: local disk and the S3 endpoint (moto), with a fake clock
where time matters. Two drivers never both hold it; a stale or dead holder is taken over; a
holder that lost it knows on its next renewal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from pipeline.errors import OutputError
from pipeline.layout import LEASE_FILE, OutputLayout
from pipeline.lease import LeaseLost, OutputLease, process_space, process_started
from pipeline.state import LeaseRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def layout(request, tmp_path) -> OutputLayout:
    if request.param == "local":
        return OutputLayout(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return OutputLayout(f"s3://{bucket}/out", request.getfixturevalue("s3_options"))


def held(layout: OutputLayout) -> LeaseRecord:
    with layout.fs.open(layout.pipeline_path(LEASE_FILE), "rb") as fh:
        return LeaseRecord.model_validate_json(fh.read())


def test_a_second_driver_is_refused_in_one_line_naming_the_holder(layout):
    clock = Clock()
    first = OutputLease(layout, "nightly", 60, clock)
    first.acquire()
    assert held(layout).token == first.record.token
    clock.now += 12
    second = OutputLease(layout, "manual", 60, clock)
    with pytest.raises(OutputError) as refused:
        second.acquire()
    text = str(refused.value)
    assert "\n" not in text and "held by another driver" in text
    assert f"pid {os.getpid()}" in text and "job nightly" in text
    assert "last renewed 12 s ago" in text and "--wait" in text
    first.release()
    assert not layout.fs.exists(layout.pipeline_path(LEASE_FILE))
    second.acquire()  # free again
    assert held(layout).job == "manual"
    second.release()


def test_a_lease_not_renewed_for_its_timeout_is_taken_over_and_the_old_holder_learns_it(layout):
    clock = Clock()
    first = OutputLease(layout, "first", 30, clock)
    first.acquire()
    clock.now += 20
    first.renew()
    clock.now += 25  # 25 s since the renewal: still held
    with pytest.raises(OutputError):
        OutputLease(layout, "second", 30, clock).acquire()
    clock.now += 10  # 35 s: expired
    second = OutputLease(layout, "second", 30, clock)
    second.acquire()
    record = held(layout)
    assert record.token == second.record.token and "job first" in record.took_over
    first.renew()
    assert "taken over" in first.lost() and "job second" in first.lost()
    with pytest.raises(LeaseLost):
        first.check()
    first.release()  # a holder that lost it removes nothing
    assert held(layout).token == second.record.token
    second.check()  # still ours
    second.release()


def test_racing_takeovers_leave_exactly_one_holder(layout):
    clock = Clock()
    stale = OutputLease(layout, "stale", 5, clock)
    stale.acquire()
    clock.now += 60
    leases = [OutputLease(layout, f"racer-{i}", 5, clock) for i in range(6)]
    won, refused = [], []

    def race(lease: OutputLease) -> None:
        try:
            lease.acquire()
            won.append(lease)
        except OutputError:
            refused.append(lease)

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert held(layout).token == won[0].record.token


def test_a_holder_that_cannot_renew_for_its_timeout_loses_the_lease(tmp_path):
    clock = Clock()
    layout = OutputLayout(str(tmp_path / "out"))
    lease = OutputLease(layout, "job", 10, clock)
    lease.acquire()

    class Broken:
        def read(self):
            raise OSError("storage unreachable")

    lease.store = Broken()
    clock.now += 5
    lease.renew()
    assert lease.lost() is None  # one failed renewal is no loss
    clock.now += 6
    lease.renew()
    assert "could not be renewed for 11 s" in lease.lost()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    """A driver killed with SIGKILL leaves its lease; the next run on the same machine sees
    its process is gone and takes over without waiting for the timeout."""
    layout = OutputLayout(str(tmp_path / "out"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = process_started(child.pid)
    record = LeaseRecord(token="dead", host="here", pid=child.pid, pid_started=started,
                         process_space=process_space(), job="killed", started_at=0,
                         renewed_at=9e12, timeout_s=3600)  # renewed "in the future"
    path = layout.pipeline_path(LEASE_FILE)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as fh:
        fh.write(record.model_dump_json())
    with pytest.raises(OutputError, match="job killed"):
        OutputLease(layout, "next", 60).acquire()  # alive: refused
    child.kill()
    child.wait()
    lease = OutputLease(layout, "next", 60)
    lease.acquire()
    assert "job killed" in held(layout).took_over
    lease.release()


def test_the_heartbeat_renews_and_wait_waits_for_the_release(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    first = OutputLease(layout, "first", 0.8)
    first.acquire()
    first.start_heartbeat()
    told: list[str] = []
    second = OutputLease(layout, "second", 0.8)
    releaser = threading.Timer(1.5, first.release)
    releaser.start()
    second.acquire(wait=True, on_wait=told.append, poll_s=0.1)
    # Held past its 0.8 s timeout by the heartbeat, then released: never taken over.
    assert held(layout).took_over is None and first.lost() is None
    assert len(told) == 1 and "job first" in told[0]
    second.release()


def test_the_lease_file_is_json_with_the_holder(tmp_path):
    layout = OutputLayout(str(tmp_path / "out"))
    lease = OutputLease(layout, "named", 60)
    lease.acquire()
    lease.note_ray_job("03000000")
    data = json.loads((tmp_path / "out" / "_pipeline" / "lease.json").read_text())
    assert {"host", "pid", "job", "ray_job_id", "started_at", "renewed_at", "timeout_s"} <= \
        set(data) and data["ray_job_id"] == "03000000" and data["format_version"] == 2
    lease.release()

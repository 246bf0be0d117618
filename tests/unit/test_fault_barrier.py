"""The "barrier" fault action: a shard waits until enough worker processes have arrived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pipeline.faults import maybe_inject

CALL = "from pipeline.faults import maybe_inject; maybe_inject('worker.start', 's1', 1)"


def _rule(folder, parties: int, timeout_s: float) -> str:
    return json.dumps([{"point": "worker.start", "action": "barrier", "dir": str(folder),
                        "parties": parties, "timeout_s": timeout_s}])


def test_first_process_waits_for_the_second(tmp_path):
    env = {**os.environ, "PIPELINE_FAULTS": _rule(tmp_path / "gate", 2, 60)}
    first = subprocess.Popen([sys.executable, "-c", CALL], env=env)
    time.sleep(1.0)
    assert first.poll() is None  # still held: only one party so far
    second = subprocess.run([sys.executable, "-c", CALL], env=env, timeout=60)
    assert second.returncode == 0
    assert first.wait(timeout=30) == 0
    assert len(list((tmp_path / "gate").iterdir())) == 2


def test_barrier_gives_up_after_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULTS", _rule(tmp_path / "gate", 2, 0.3))
    started = time.monotonic()
    maybe_inject("worker.start", "s1", 1)  # alone: returns at the timeout, raises nothing
    assert 0.3 <= time.monotonic() - started < 5


def test_other_points_pass_straight_through(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULTS", _rule(tmp_path / "gate", 2, 30))
    started = time.monotonic()
    maybe_inject("worker.infer", "s1", 1)
    assert time.monotonic() - started < 1 and not (tmp_path / "gate").exists()

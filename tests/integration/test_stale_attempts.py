"""A late attempt never replaces a committed shard's files, on a local disk and on S3 (moto).

The race is played in one process, in a fixed order, with no timing: attempt 1 starts writing,
attempt 2 runs and commits the shard, then attempt 1 finishes. Attempt 1 must find the marker,
discard its own files and report the committed marker; part file, dead letters and marker keep
attempt 2's bytes, and no temp file or pending upload is left behind.
"""

from __future__ import annotations

import errno
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import worker as worker_module
from pipeline.actor_pool import Done
from pipeline.commit import ShardWriter
from pipeline.demo.tabular import make_scoring_table
from pipeline.job_file import load_spec
from pipeline.layout import OutputLayout
from pipeline.planning import plan_job
from pipeline.pools import PoolSettings
from pipeline.report import ReportInputs, build_report
from pipeline.runner import Runner
from pipeline.state import ShardMarker, Superseded
from pipeline.worker import ShardWorker
from tests.reliability.harness import MODELS
from tests.support.fake_cluster import FakeActors
from tests.support.leftovers import leftovers
from tests.support.records import marker_for


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", request.getfixturevalue("s3_options")


def snapshot(layout: OutputLayout, sid: str) -> dict[str, bytes | None]:
    layout.fs.invalidate_cache()
    found = {}
    for path in (layout.part_path(sid), layout.dead_letter_path(sid), layout.marker_path(sid)):
        try:
            found[path] = layout.fs.cat_file(path)
        except FileNotFoundError:
            found[path] = None
    return found


def marker(sid: str, attempt: int, rows_out: int, rows_bad: int) -> ShardMarker:
    return marker_for(sid, attempt=attempt, rows_in=rows_out + rows_bad, rows_out=rows_out,
                      rows_bad=rows_bad, attempt_token=f"token-{attempt}", committed_at=1.0)


# ----------------------------------------------------------------------------- ShardWriter


def test_late_writer_finds_the_marker_and_discards_its_files(output):
    layout = OutputLayout(*output)
    sid = "s1"
    late = ShardWriter(layout, sid, "zstd", {})  # attempt 1: slow, starts first
    late.write(pa.table({"id": [1, 2, 3], "who": ["late"] * 3}))  # no dead letters

    with ShardWriter(layout, sid, "zstd", {}) as first:  # attempt 2 commits meanwhile
        first.write(pa.table({"id": [1, 2], "who": ["first"] * 2}))
        first.write_dead(pa.table({"id": [3], "_reason": ["bad row"]}))
        committed, ours = first.commit(marker(sid, 2, 2, 1))
    assert ours and committed.attempt == 2
    before = snapshot(layout, sid)
    assert all(before.values())

    with late:  # attempt 1 finishes after the commit
        late.write(pa.table({"id": [4], "who": ["late"]}))
        committed, ours = late.commit(marker(sid, 1, 4, 0))
    assert not ours and not late.published
    assert committed == marker(sid, 2, 2, 1)
    # Same bytes: the part file was not replaced, the dead letters were not removed.
    assert snapshot(layout, sid) == before
    assert pq.read_table(layout.fs.open(layout.part_path(sid)))["who"].to_pylist() == ["first"] * 2
    assert leftovers(layout) == []


def test_marker_is_never_replaced_even_inside_the_window(output, monkeypatch):
    """The late attempt checks for a marker just before the other one creates it (the window
    object stores keep): its files go out, but its marker does not, and it says so."""
    layout = OutputLayout(*output)
    sid = "s2"
    late = ShardWriter(layout, sid, "zstd", {})
    late.write(pa.table({"id": [1]}))
    with ShardWriter(layout, sid, "zstd", {}) as first:
        first.write(pa.table({"id": [1]}))
        first.commit(marker(sid, 2, 1, 0))
    committed_marker = snapshot(layout, sid)[layout.marker_path(sid)]
    monkeypatch.setattr(layout, "committed_marker",
                        lambda shard_id: None if shard_id == sid and not late.published
                        else OutputLayout.committed_marker(layout, shard_id))
    with late:
        committed, ours = late.commit(marker(sid, 1, 1, 0))
    assert not ours and late.published and committed.attempt == 2
    assert snapshot(layout, sid)[layout.marker_path(sid)] == committed_marker
    assert leftovers(layout) == []


def test_exclusive_marker_without_hard_links(tmp_path, monkeypatch):
    """Some mounts refuse hard links: exists-then-rename under the commit lock instead."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    layout = OutputLayout(str(tmp_path / "out"))
    assert layout.create_marker(marker_for("s", attempt=1)) is True
    assert layout.create_marker(marker_for("s", attempt=2)) is False
    assert layout.committed_marker("s").attempt == 1
    assert leftovers(layout) == []


# ----------------------------------------------------------------------------- ShardWorker


@pytest.fixture()
def planned(output, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(make_scoring_table(60, seed=5), tmp_path / "in" / "a.parquet")
    uri, options = output
    spec = load_spec({"input": {"uri": str(tmp_path / "in")},
                      "model": {"uri": str(MODELS / "breast_cancer")},
                      "task": {"kind": "classify"}, "passthrough": ["id"],
                      "batching": {"window_rows": 20},
                      "output": {"uri": uri, "storage_options": options}})
    job = plan_job(spec)
    assert len(job.plan.shards) == 1
    return job


def test_late_attempt_of_a_worker_returns_the_committed_marker(planned, monkeypatch):
    pool = PoolSettings("cpu", ("cpu",), 1)
    slow, fast = (ShardWorker(planned.spec, planned.fingerprint, planned.read_columns, pool)
                  for _ in range(2))
    shard = planned.plan.shards[0]
    layout = slow.layout
    seen: dict = {}

    def attempt_2_commits_while_attempt_1_runs(point, shard_id, attempt):
        if point == "worker.infer" and attempt == 1 and "marker" not in seen:
            seen["marker"] = fast.process(shard.to_dict(), 2)
            seen["files"] = snapshot(layout, shard.id)

    monkeypatch.setattr(worker_module, "maybe_inject", attempt_2_commits_while_attempt_1_runs)
    late = slow.process(shard.to_dict(), 1)

    own = seen["marker"]
    assert own.superseded is None and own.marker.attempt == 2
    assert late.superseded == Superseded(attempt=1, worker=slow.identity, published=False)
    assert late.marker == own.marker
    assert snapshot(layout, shard.id) == seen["files"]
    assert leftovers(layout) == []

    # The runner takes the late result as a success and counts the shard once.
    commits: list[int] = []

    class Progress:
        def commit(self, rows: int) -> None:
            commits.append(rows)

        def shard_failed(self) -> None: ...
        def tick(self) -> None: ...

    backend = FakeActors()
    runner = Runner(planned.spec, planned.plan.shards, backend, progress=Progress())
    (worker,) = runner.pool.grow(1, force=True)
    runner.on_result(worker.ready_ref)
    backend.results = {
        "late": Done(late.model_copy(update={"superseded": Superseded(
            attempt=1, worker="w1", published=False)})),
        "own": Done(own)}
    for ref in ("late", "own"):
        runner.pool.add_call(worker.id, ref, shard.id)
        runner.on_result(ref)
    assert runner.outcome.markers == {shard.id: own.marker}
    assert commits == [60]
    assert runner.outcome.notes == [f"shard {shard.id}: attempt 1 on w1 found it committed by "
                                    f"attempt 2 on {fast.identity}; its own files were discarded"]
    report = build_report(ReportInputs("t", layout.uri, planned.plan, planned.fingerprint,
                                       planned.bundle, 0.0, 0.01), runner.outcome, {})
    assert report.totals.rows_in == 60 and report.totals.committed == 1

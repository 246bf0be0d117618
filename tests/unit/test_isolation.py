"""Isolating rows that kill workers, without a cluster: how deaths are read, how shards are
cut and settled, and the whole dispatch loop against fake workers that die on given rows."""

from __future__ import annotations

import pytest

from pipeline.actor_pool import Done, Failed, Gone
from pipeline.errors import OutOfMemory
from pipeline.isolation import (
    Isolation,
    death_kind,
    death_summary,
    range_of,
    remaining_pieces,
    root_of,
    root_shard,
    roots_done,
    sub_shard,
)
from pipeline.plan import Piece, make_shard
from pipeline.runner import Runner
from pipeline.scheduler import RetryPolicy, Scheduler
from pipeline.state import ShardResult
from tests.support.records import marker_for
from tests.unit.test_runner_policy import Clock, TimedActors, spec

# Ray 2.60's words, as ActorDiedError carries them (ids and addresses cut).
PROCESS_DIED = (
    "The actor died unexpectedly before finishing this task. class_name: ShardWorker "
    "actor_id: 1a2b pid: 4242 The actor is dead because its worker process has died. Worker "
    "exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection "
    "error code 2. End of file. Some common causes include: (1) the process was killed by the "
    "OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker "
    "crashed unexpectedly due to SIGSEGV or another unexpected error.")
NODE_DIED = ("The actor died unexpectedly before finishing this task. The actor is dead "
             "because its node has died. Node Id: 9f8e")
OOM_KILLED = ("The actor is dead because its worker process has died. Worker exit type: "
              "NODE_OUT_OF_MEMORY Worker exit detail: Task was killed due to the node running "
              "low on memory.")
RAY_KILL = "The actor is dead because it was killed by `ray.kill`."


def shard(rows: int = 16, name: str = "a"):
    return make_shard([Piece(f"s3://b/in/{name}.parquet", "v1", "parquet", "rows", 0, rows)],
                      rows, rows * 100)


def test_deaths_are_read_from_rays_words():
    assert death_kind(PROCESS_DIED) == "process"  # "OOM killer" here is only a guess of Ray's
    assert death_kind(NODE_DIED) == "node"
    assert death_kind(PROCESS_DIED, preempted=True) == "node"
    assert death_kind(OOM_KILLED) == "memory"
    assert death_kind(RAY_KILL) == "stopped"
    assert death_kind("no result within retry.shard_timeout_s=10s") == "stopped"
    assert death_kind("something else") == "other"
    assert death_summary(PROCESS_DIED) == \
        "SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2"


def test_sub_shards_name_their_root_and_rows():
    root = shard(16)
    piece = sub_shard(root, 4, 8, 16)
    assert piece.id == f"{root.id}-r4-8of16" and piece.rows == 4 and piece.pieces == root.pieces
    assert root_of(piece.id) == root.id and range_of(piece.id) == (4, 8, 16)
    assert range_of(root.id) is None and root_of(root.id) == root.id
    assert root_shard(piece).id == root.id and root_shard(piece).rows == 16


def test_a_root_is_done_when_its_pieces_cover_it_and_the_rest_is_what_remains():
    root = shard(16)
    ids = {f"{root.id}-r0-8of16", f"{root.id}-r8-12of16"}
    assert roots_done([root.id], ids) == set()
    assert [range_of(p.id) for p in remaining_pieces(root, ids)] == [(12, 16, 16)]
    assert remaining_pieces(root, set()) is None  # never cut: runs whole
    ids.add(f"{root.id}-r12-16of16")
    assert roots_done([root.id], ids) == {root.id} and remaining_pieces(root, ids) == []
    assert roots_done([root.id], {root.id}) == {root.id}
    gap = {f"{root.id}-r0-4of16", f"{root.id}-r8-16of16"}
    assert [range_of(p.id) for p in remaining_pieces(root, gap)] == [(4, 8, 16)]


def test_a_death_isolates_then_halves_then_dead_letters_within_the_budget():
    root = shard(4)
    policy = Isolation([root], max_split_attempts=4)
    assert policy.after_death(root, False, "process", PROCESS_DIED, 4).action == "isolate"
    split = policy.after_death(root, True, "process", PROCESS_DIED, 4)
    assert split.action == "split" and [p.rows_range for p in split.pieces] == [(0, 2), (2, 4)]
    split = policy.after_death(split.pieces[1], True, "process", PROCESS_DIED, 4)
    assert [p.rows_range for p in split.pieces] == [(2, 3), (3, 4)]
    last = policy.after_death(split.pieces[0], True, "process", PROCESS_DIED, 4)
    assert last.action == "dead_letter" and last.pieces[0].rows_range == (2, 3)
    assert last.pieces[0].dead_letter.startswith("worker process died on this row (SYSTEM_ERROR")
    over = policy.after_death(split.pieces[1], True, "process", PROCESS_DIED, 4)
    assert over.action == "fail" and "retry.max_split_attempts=4" in over.message
    assert policy.after_death(root, True, "node", NODE_DIED, 4).action == "retry"


def test_memory_cuts_halve_the_batches_too():
    root = shard(8)
    policy = Isolation([root], max_split_attempts=10)
    first = policy.after_memory_error(root, "out of memory: MemoryError", 8)
    assert [p.batch_rows for p in first.pieces] == [32, 32]
    second = policy.after_death(first.pieces[0], True, "memory", OOM_KILLED, 8)
    assert [p.batch_rows for p in second.pieces] == [16, 16]
    assert policy.after_memory_error(root, "x", None).action == "fail"  # rows unknown


def test_a_burst_of_deaths_is_no_rows_doing():
    policy = Isolation([shard()], max_split_attempts=10)
    assert not policy.is_burst(0.0) and not policy.is_burst(0.5)
    assert policy.is_burst(0.9)
    assert not policy.is_burst(5.0)


def test_a_shard_that_runs_alone_has_its_worker_to_itself():
    scheduler = Scheduler(["a", "b", "c"], RetryPolicy(backoff_s=0), max_in_flight=2)
    for worker in ("w1", "w2"):
        scheduler.add_worker(worker)
    first = scheduler.assignments()
    assert len(first) == 3
    lost = scheduler.take_worker("w1")
    scheduler.add_worker("w3")
    for sid in lost:
        scheduler.run_alone(sid, "died")
    again = scheduler.assignments()
    # w3 is empty: it takes one shard alone; the other waits for an empty worker.
    assert [(w, s) for w, s, _ in again] == [("w3", lost[0])]
    assert scheduler.assignments() == []  # w3 takes nothing beside it
    scheduler.succeeded("w3", lost[0])
    assert [(w, s) for w, s, _ in scheduler.assignments()] == [("w3", lost[1])]
    scheduler.replace(lost[1], ["p1", "p2"], alone=True, error="died")
    assert not scheduler.finished()


def test_a_busy_worker_drains_for_a_shard_that_must_run_alone():
    scheduler = Scheduler([f"s{i}" for i in range(8)], RetryPolicy(backoff_s=0), max_in_flight=2)
    scheduler.add_worker("w1")
    scheduler.assignments()
    scheduler.call_ended("w1", "s0")  # s0 failed for lack of memory: it runs alone next
    scheduler.run_alone("s0", "out of memory")
    assert scheduler.assignments() == []  # w1 is left to drain, not refilled
    scheduler.succeeded("w1", "s1")
    assert [(w, s) for w, s, _ in scheduler.assignments()] == [("w1", "s0")]


# ----------------------------------------------------------------------------- the whole loop


def dies_on(rows: dict[str, set[int]], clock: Clock, kind: str = "process"):
    """Fake workers whose process dies when a call's rows hold a poison row, a few seconds
    after it started (a new worker loads its model, then reaches the row)."""

    def on_submit(handle, piece, attempt):
        poison = rows.get(root_of(piece.id), set())
        start, end = piece.rows_range or (0, piece.rows)
        hit = {r for r in poison if start <= r < end}
        if hit and not piece.dead_letter:
            clock.advance(2.0)
            return Gone(OOM_KILLED if kind == "memory" else PROCESS_DIED, kind=kind)
        bad = end - start if piece.dead_letter else 0
        marker = marker_for(piece.id, attempt=attempt, worker=handle, rows_in=end - start,
                            rows_out=end - start - bad, rows_bad=bad)
        return Done(ShardResult(marker=marker))

    return on_submit


@pytest.mark.parametrize("kind", ["process", "memory"])
def test_poison_rows_on_three_shards_are_dead_lettered_and_the_rest_commits(kind):
    clock = Clock()
    roots = [shard(16, name) for name in "abcde"]
    poison = {roots[0].id: {3}, roots[2].id: {0}, roots[4].id: {15}}
    actors = TimedActors(clock, on_submit=dies_on(poison, clock, kind))
    outcome = Runner(spec(max_in_flight=2), roots, actors, clock=clock).run()
    assert outcome.failed == {} and outcome.aborted is None
    assert sorted(range_of(s) for s in outcome.isolated_rows) == \
        [(0, 1, 16), (3, 4, 16), (15, 16, 16)]
    committed = set(outcome.markers)
    assert roots_done([r.id for r in roots], committed) == {r.id for r in roots}
    rows = sum(m.rows_in for m in outcome.markers.values())
    assert rows == 5 * 16  # every row once: no piece overlaps another, none is missing
    assert sum(m.rows_bad for m in outcome.markers.values()) == 3
    assert set(outcome.splits) == set(poison)


def test_a_memory_error_reported_by_the_worker_is_cut_without_a_death():
    clock = Clock()
    root = shard(8)

    def on_submit(handle, piece, attempt):
        start, end = piece.rows_range or (0, 8)
        if start <= 5 < end and not piece.dead_letter:
            return Failed(OutOfMemory("out of memory: MemoryError"), "out of memory")
        bad = end - start if piece.dead_letter else 0
        return Done(ShardResult(marker=marker_for(piece.id, attempt=attempt, worker=handle,
                                                  rows_in=end - start,
                                                  rows_out=end - start - bad, rows_bad=bad)))

    actors = TimedActors(clock, on_submit=on_submit)
    outcome = Runner(spec(), [root], actors, clock=clock).run()
    assert outcome.actor_deaths == 0 and outcome.failed == {}
    [(piece, why)] = outcome.isolated_rows.items()
    assert range_of(piece) == (5, 6, 8) and why.startswith("too large for this worker")


def test_without_a_split_budget_a_poison_shard_fails_as_before():
    clock = Clock()
    root = shard(8)
    actors = TimedActors(clock, on_submit=dies_on({root.id: {2}}, clock))
    job = spec(max_attempts=2)
    job = job.model_copy(update={"retry": job.retry.model_copy(update={"max_split_attempts": 0})})
    outcome = Runner(job, [root], actors, clock=clock).run()
    assert set(outcome.failed) == {root.id} and outcome.splits == {}

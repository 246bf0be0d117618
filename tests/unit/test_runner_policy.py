"""The driver's policies without a cluster: the health rules with plain numbers, the actor pool
and the dispatch loop with fake actors and a fake clock (as Ray Data tests its actor pool)."""

from __future__ import annotations

import pytest

from pipeline import health
from pipeline.actor_pool import ActorPool, Done, Failed, Gone, WorkerState
from pipeline.errors import DeviceError, ShardError
from pipeline.job_file import load_spec
from pipeline.plan import Piece, make_shard
from pipeline.pools import PoolPlan, PoolSettings
from pipeline.runner import Runner
from tests.support.fake_cluster import FakeActors, committed

CPU = PoolPlan(PoolSettings("cpu", ("cpu",), 1), {"CPU": 1.0}, replicas=None)
FIXED = PoolPlan(PoolSettings("cpu", ("cpu",), 1), {"CPU": 1.0}, replicas=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TimedActors(FakeActors):
    """Waiting with no result lets the fake clock run for the whole timeout."""

    def __init__(self, clock: Clock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def wait(self, refs, timeout_s):
        ready = super().wait(refs, timeout_s)
        if not ready:
            self.clock.advance(timeout_s)
        return ready


def spec(max_attempts: int = 3, **workers):
    return load_spec({"input": {"uri": "s3://b/in"}, "model": {"uri": "s3://b/m"},
                      "task": {"kind": "embed"}, "output": {"uri": "s3://b/out"},
                      "workers": {"cpu": {"replicas": 2}, "start_timeout_s": 30, **workers},
                      "retry": {"backoff_s": 0, "max_attempts": max_attempts,
                                "shard_timeout_s": 10}})


def shards(n: int):
    return [make_shard([Piece(f"s3://b/in/{i}.parquet", "v1", "parquet")], 1, 10)
            for i in range(n)]


# ----------------------------------------------------------------------------- health rules


def test_deaths_abort_only_past_twice_the_largest_pool_and_three_more():
    assert not health.too_many_deaths(7, most_actors=2)
    assert health.too_many_deaths(8, most_actors=2)
    assert not health.too_many_deaths(3, most_actors=0)


def test_start_watch_runs_while_no_worker_is_ready_and_restarts_when_all_are_lost():
    watch = health.StartWatch(now=0.0)
    assert not watch.expired(starting_workers=1, now=30.0, limit_s=30.0)
    assert watch.expired(starting_workers=1, now=30.5, limit_s=30.0)
    assert not watch.expired(starting_workers=0, now=99.0, limit_s=30.0)  # none left to wait on
    watch.update(ready_workers=1, now=31.0)
    assert not watch.expired(starting_workers=1, now=500.0, limit_s=30.0)
    watch.update(ready_workers=0, now=500.0)  # the last ready worker is gone: a new clock
    assert not watch.expired(starting_workers=1, now=529.0, limit_s=30.0)
    assert watch.expired(starting_workers=1, now=531.0, limit_s=30.0)


def test_a_worker_is_hung_when_its_oldest_call_outlasts_its_whole_queue():
    calls = [("cpu-1", 0.0), ("cpu-1", 50.0), ("cpu-2", 15.0)]
    assert health.hung_workers(calls, now=20.5, shard_timeout_s=10, max_in_flight=2) == {"cpu-1"}
    assert health.hung_workers(calls, now=20.0, shard_timeout_s=10, max_in_flight=2) == set()


# ----------------------------------------------------------------------------- the actor pool


def test_fixed_pool_starts_its_replicas_and_keeps_one_record_per_worker():
    clock = Clock()
    actors = FakeActors(ready_at_once=False)
    pool = ActorPool([FIXED], actors, clock=clock)
    started = pool.grow(remaining_shards=5, force=True)
    assert [w.id for w in started] == ["cpu-1", "cpu-2"] and pool.most_actors == 2
    assert [w.state for w in pool.workers.values()] == [WorkerState.STARTING] * 2
    assert pool.refs() == ["ready:cpu-1", "ready:cpu-2"]
    assert pool.starting_with("ready:cpu-2").id == "cpu-2"

    pool.mark_ready("cpu-1", actors.ready_figures("cpu-1"))
    pool.add_call("cpu-1", "call-a", "shard-a")
    assert pool.in_state(WorkerState.READY)[0].id == "cpu-1"
    assert pool.refs() == ["call-a", "ready:cpu-2"] and pool.in_flight_by_pool() == {"cpu": 1}
    assert list(pool.calls()) == [("cpu-1", clock.now)]

    lost = pool.remove("cpu-1")
    assert lost.calls == {"call-a": ("shard-a", clock.now)} and actors.killed == ["cpu-1"]
    assert [w.id for w in pool.retired] == ["cpu-1"] and pool.retired[0].worker == "cpu-1"
    assert pool.grow(remaining_shards=5) == []  # within the grow interval
    pool.grow_soon()
    assert [w.id for w in pool.grow(remaining_shards=5)] == ["cpu-3"]  # the replacement
    pool.shutdown()
    assert pool.workers == {} and sorted(actors.killed) == ["cpu-1", "cpu-2", "cpu-3"]


def test_elastic_pool_grows_with_free_resources_and_asks_the_autoscaler_once():
    clock = Clock()
    actors = FakeActors(free={"CPU": 2.0}, ready_at_once=False)
    pool = ActorPool([CPU], actors, clock=clock)
    assert len(pool.grow(remaining_shards=10, force=True)) == 2  # what fits
    assert actors.requests == [[{"CPU": 1.0}] * 10]
    actors.free = {"CPU": 0.0}
    clock.advance(1.5)
    assert pool.grow(remaining_shards=10) == []  # nothing free, and two still wait to start
    assert len(actors.requests) == 1  # the same request is not sent again
    for w in list(pool.workers):
        pool.mark_ready(w, actors.ready_figures(w))
    clock.advance(1.5)
    assert [w.id for w in pool.grow(remaining_shards=10)] == ["cpu-3"]  # one waits for a node
    clock.advance(1.5)
    pool.grow(remaining_shards=1)  # almost done: the request shrinks
    assert actors.requests[-1] == [{"CPU": 1.0}]
    pool.shutdown()
    assert actors.requests[-1] == []


def test_a_pinned_pool_never_asks_the_autoscaler_for_nodes():
    actors = FakeActors(free={"CPU": 1.0})
    pool = ActorPool([CPU], actors, autoscale=False, clock=Clock())
    pool.grow(remaining_shards=10, force=True)
    assert actors.requests == [[]]


# ----------------------------------------------------------------------------- the loop


def test_every_shard_commits_once_across_the_workers():
    clock = Clock()
    actors = TimedActors(clock)
    outcome = Runner(spec(), shards(5), actors, clock=clock).run()
    assert len(outcome.markers) == 5 and outcome.failed == {} and outcome.aborted is None
    assert sorted(sid for _, sid, _ in actors.submitted) == sorted(outcome.markers)
    assert {w for w, _, _ in actors.submitted} == {"cpu-1", "cpu-2"}  # both took shards
    assert sorted(w.id for w in outcome.workers) == ["cpu-1", "cpu-2"]
    assert sorted(actors.killed) == ["cpu-1", "cpu-2"]  # released at the end


def test_a_lost_worker_requeues_its_shard_and_is_replaced():
    clock = Clock()

    def first_call_loses_its_worker(handle, shard, attempt):
        if not actors.submitted[:-1]:
            return Gone("The actor died unexpectedly before finishing this task.")
        return committed(handle, shard, attempt)

    actors = TimedActors(clock, on_submit=first_call_loses_its_worker)
    outcome = Runner(spec(max_in_flight=1), shards(3), actors, clock=clock).run()
    assert len(outcome.markers) == 3 and outcome.actor_deaths == 1
    (lost_sid,) = [sid for sid, n in outcome.attempts.items() if n == 2]
    assert [e.type for e in outcome.errors[lost_sid]] == ["WorkerLost"]
    assert outcome.errors[lost_sid][0].message.startswith("worker lost: The actor died")
    assert len(actors.started) == 3  # two, then the replacement


def test_workers_that_keep_dying_abort_the_run():
    clock = Clock()
    actors = TimedActors(clock, on_submit=lambda h, s, a: Gone("killed"))
    outcome = Runner(spec(max_attempts=50), shards(3), actors, clock=clock).run()
    assert outcome.aborted == "workers keep dying without committing a shard: killed"
    assert outcome.actor_deaths == 2 * 2 + 3 + 1
    assert set(outcome.failed) == {s.id for s in shards(3)} and outcome.markers == {}


def test_no_worker_ready_within_the_start_timeout_aborts():
    clock = Clock()
    actors = TimedActors(clock, ready_at_once=False)
    outcome = Runner(spec(), shards(2), actors, clock=clock).run()
    assert outcome.aborted.startswith("no worker started within workers.start_timeout_s=30s")
    assert all(reason.startswith("not run: no worker started") for reason in outcome.failed.values())


def test_a_hung_worker_is_killed_and_its_shard_goes_to_another():
    clock = Clock()

    def first_call_never_returns(handle, shard, attempt):
        return None if not actors.submitted[:-1] else committed(handle, shard, attempt)

    actors = TimedActors(clock, on_submit=first_call_never_returns)
    outcome = Runner(spec(max_in_flight=1), shards(2), actors, clock=clock).run()
    assert len(outcome.markers) == 2 and outcome.actor_deaths == 1
    hung = actors.submitted[0]
    assert hung[0] in actors.killed
    assert [e.message for e in outcome.errors[hung[1]]] == [
        "worker lost: no result within retry.shard_timeout_s=10s"]


def test_device_and_data_errors_are_recorded_by_type():
    clock = Clock()

    def errors_first(handle, shard, attempt):
        if attempt == 1 and shard.id == first:
            return Failed(DeviceError("device error on cuda: CUDA failure 700"), "device error")
        if attempt == 1:
            return Failed(ShardError("unreadable parquet file"), "unreadable parquet file")
        return committed(handle, shard, attempt)

    work = shards(2)
    first = work[0].id
    actors = TimedActors(clock, on_submit=errors_first)
    outcome = Runner(spec(), work, actors, clock=clock).run()
    assert outcome.device_errors == 1 and list(outcome.markers) == [first]
    assert [e.type for e in outcome.errors[first]] == ["DeviceError"]
    assert outcome.failed == {work[1].id: "unreadable parquet file"}  # terminal: no retry
    assert outcome.attempts[work[1].id] == 1


@pytest.mark.parametrize("replicas", [1, 3])
def test_results_of_a_removed_worker_are_ignored(replicas):
    clock = Clock()
    actors = TimedActors(clock)
    runner = Runner(spec(cpu={"replicas": replicas}), shards(1), actors, clock=clock)
    (worker, *_) = runner.pool.grow(1, force=True)
    runner.on_result(worker.ready_ref)
    runner.pool.add_call(worker.id, "late-call", "x")
    runner.pool.remove(worker.id)
    actors.results["late-call"] = Done(None)
    runner.on_result("late-call")  # its worker is gone: the shard was requeued already
    assert runner.outcome.markers == {}

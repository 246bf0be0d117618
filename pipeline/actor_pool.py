"""The actors of a run: starting, growing, losing and retiring workers, and the autoscaler.

One ``WorkerRecord`` per worker holds all that is known of it: its pool, its handle, the call
that tells when it is ready, its state (starting, ready) and the shards it has in flight. How
many actors to start, and what to ask the autoscaler for, is the pure policy of
``pipeline.pools``; the cluster is reached only through an ``ActorBackend``
(``pipeline.ray_backend`` for Ray, a fake one in tests), so this module runs without Ray.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from pipeline.plan import Shard
from pipeline.pools import PoolPlan, autoscaler_request, plan_starts, request_changed
from pipeline.state import WorkerFigures

GROW_INTERVAL_S = 1.0  # how often elastic pools look for resources that came free


@dataclass(frozen=True)
class Done:
    """A call returned ``value``."""

    value: Any


@dataclass(frozen=True)
class Failed:
    """A call raised ``cause`` in the worker (the worker itself lives on)."""

    cause: BaseException
    text: str  # the cause in one line


@dataclass(frozen=True)
class Gone:
    """The worker is gone: its process, actor or node died, or it cannot be placed."""

    reason: str
    unschedulable: bool = False  # no node can hold the actor (resources, affinity)
    kind: str = "other"  # pipeline.isolation.death_kind: process, memory, node, stopped, other


CallResult = Done | Failed | Gone


class ActorBackend(Protocol):
    """What the runner needs of a cluster: actors that score shards, and its resources."""

    def start(self, pool: PoolPlan, worker_id: str) -> tuple[Any, Any]:
        """A new worker actor of ``pool``: (handle, ref of its ``info()`` call, which resolves
        to a ``WorkerFigures`` once its session is loaded)."""
        ...

    def submit(self, handle: Any, shard: Shard, attempt: int) -> Any:
        """Start ``process(shard, attempt)`` on the worker; a ref to wait on."""
        ...

    def wait(self, refs: list[Any], timeout_s: float) -> list[Any]:
        """The refs among ``refs`` that have a result (at least one, unless the time ran out)."""
        ...

    def result(self, ref: Any) -> CallResult: ...

    def count_rows(self, shard: Shard) -> int:
        """The rows of ``shard``, read (not scored) on the cluster: to cut a shard whose
        footers did not say."""
        ...

    def kill(self, handle: Any) -> None: ...

    def free_resources(self) -> dict[str, float]: ...

    def total_resources(self) -> dict[str, float]: ...

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Tell the autoscaler what the pools want (a hint: failures are not errors)."""
        ...


class WorkerState(str, Enum):
    STARTING = "starting"  # asked for; not answering yet (no resources, loading the model)
    READY = "ready"  # its session is loaded: it takes shards


@dataclass
class WorkerRecord:
    id: str
    plan: PoolPlan
    handle: Any
    ready_ref: Any  # resolves once the worker is ready
    asked_at: float
    state: WorkerState = WorkerState.STARTING
    figures: WorkerFigures | None = None  # what it told about itself once ready
    calls: dict[Any, tuple[str, float]] = field(default_factory=dict)  # ref -> shard, sent at

    @property
    def pool(self) -> str:
        return self.plan.name

    def summary(self) -> WorkerFigures:
        """The worker as the report lists it (the counts come from its shards' markers)."""
        base = self.figures or WorkerFigures(pool=self.pool)
        return base.model_copy(update={"id": self.id, "pool": self.pool})


class ActorPool:
    """The live workers of every pool of a run, and those that are gone (for the report)."""

    def __init__(self, plans: list[PoolPlan], backend: ActorBackend, autoscale: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plans = plans
        self.backend = backend
        self.autoscale = autoscale  # False: new nodes could not run these workers (pinned)
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self.retired: list[WorkerFigures] = []
        self.most_actors = 0  # the largest pool size so far: losing a whole node is no abort
        self._owner: dict[Any, str] = {}  # ref with a result to come -> its worker (O(1) lookups)
        self._seq = 0
        self._next_grow = 0.0
        self._requested: list[dict[str, float]] | None = None  # last autoscaler request

    # ------------------------------------------------------------------ views

    def starting_count(self) -> int:
        """Workers started that are not ready yet."""
        return len(self.in_state(WorkerState.STARTING))

    def in_state(self, state: WorkerState) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.state is state]

    def refs(self) -> list[Any]:
        """Every ref with a result still to come: calls in flight, then workers starting."""
        calls = [ref for w in self.workers.values() for ref in w.calls]
        return calls + [w.ready_ref for w in self.in_state(WorkerState.STARTING)]

    def starting_with(self, ref: Any) -> WorkerRecord | None:
        record = self.workers.get(self._owner.get(ref, ""))
        if record is None or record.state is not WorkerState.STARTING or record.ready_ref != ref:
            return None
        return record

    def call_of(self, ref: Any) -> WorkerRecord | None:
        record = self.workers.get(self._owner.get(ref, ""))
        return record if record is not None and ref in record.calls else None

    def calls(self) -> Iterator[tuple[str, float]]:
        """(worker, dispatched at) of every call in flight."""
        for w in self.workers.values():
            for _, sent in w.calls.values():
                yield w.id, sent

    def in_flight_by_pool(self) -> Counter[str]:
        return Counter(w.pool for w in self.workers.values() for _ in w.calls)

    # ------------------------------------------------------------------ changes

    def grow(self, remaining_shards: int, force: bool = False) -> list[WorkerRecord]:
        """Start the actors the pools lack (replacing lost ones, using nodes that joined) and
        keep the autoscaler's request in line with what the elastic pools still want."""
        now = self.clock()
        if not force and now < self._next_grow:
            return []
        self._next_grow = now + GROW_INTERVAL_S
        live = Counter(w.pool for w in self.workers.values())
        waiting = Counter(w.pool for w in self.in_state(WorkerState.STARTING))
        short = any(p.elastic and p.target(remaining_shards) > live[p.name] for p in self.plans)
        free = self.backend.free_resources() if short else {}
        started = []
        for name, count in plan_starts(self.plans, live, waiting, free, remaining_shards).items():
            plan = next(p for p in self.plans if p.name == name)
            started += [self._start(plan) for _ in range(count)]
        self.request_resources(autoscaler_request(self.plans, remaining_shards))
        return started

    def _start(self, plan: PoolPlan) -> WorkerRecord:
        self._seq += 1
        wid = f"{plan.name}-{self._seq}"
        handle, ready_ref = self.backend.start(plan, wid)
        record = self.workers[wid] = WorkerRecord(wid, plan, handle, ready_ref, self.clock())
        self._owner[ready_ref] = wid
        self.most_actors = max(self.most_actors, len(self.workers))
        return record

    def grow_soon(self) -> None:
        """Look for resources on the next pass (a worker was lost: replace it at once)."""
        self._next_grow = 0.0

    def mark_ready(self, wid: str, figures: WorkerFigures) -> WorkerRecord | None:
        record = self.workers.get(wid)
        if record is not None:
            record.state = WorkerState.READY
            record.figures = figures
            self._owner.pop(record.ready_ref, None)
        return record

    def add_call(self, wid: str, ref: Any, shard_id: str) -> None:
        self.workers[wid].calls[ref] = (shard_id, self.clock())
        self._owner[ref] = wid

    def take_call(self, ref: Any) -> tuple[WorkerRecord, str, float] | None:
        """The worker, shard and dispatch time of a call that has a result."""
        record = self.call_of(ref)
        if record is None:
            return None
        shard_id, sent = record.calls.pop(ref)
        self._owner.pop(ref, None)
        return record, shard_id, sent

    def remove(self, wid: str) -> WorkerRecord | None:
        """A worker is lost (or given up on): kill it, forget its calls, keep its summary."""
        record = self.workers.pop(wid, None)
        if record is None:
            return None
        for ref in [record.ready_ref, *record.calls]:
            self._owner.pop(ref, None)
        self.backend.kill(record.handle)
        self.retired.append(record.summary())
        return record

    def shutdown(self) -> None:
        """The run is over: release the autoscaler request and every worker."""
        self.request_resources([])
        for wid in list(self.workers):
            self.remove(wid)

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        if not self.autoscale:
            bundles = []
        if not request_changed(self._requested, bundles):
            return
        self._requested = bundles
        self.backend.request_resources(bundles)

"""Scheduling policy, free of Ray: one queue, an in-flight cap per worker, retry with backoff.

Fast workers take more shards because every free slot pulls from the same queue. A worker's
second slot (a shard queued behind the one it runs) is filled only while more shards wait
than there are idle or starting workers: two shards must not both go to the first worker up
while the second starts (measured: half the throughput of a two-shard job). A retried
shard waits (exponential backoff with jitter) and prefers a worker other than the one it
failed on. The runner feeds events in and executes the assignments that come out.

Every event costs O(1) or O(log n) in the number of shards (a deque of ready shards, a heap
of backing-off ones), so a job of 100,000 shards does not slow the driver down.

Shards suspected of killing their worker run *alone* (``pipeline.isolation``): they wait in a
queue of their own, go only to a worker with nothing in flight, and that worker takes nothing
else until they return, so a death names its shard. A shard may be *replaced* by pieces (its
sub-shards), which then settle it.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PICK_SCAN = 64  # ready shards a worker looks at before taking one that failed on it


@dataclass
class ShardState:
    id: str
    attempts: int = 0
    not_before: float = 0.0
    last_worker: str | None = None
    errors: list[Any] = field(default_factory=list)  # what the caller recorded per failure


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return base * rng.uniform(0.5, 1.5)


class Scheduler:
    def __init__(self, shard_ids: list[str], policy: RetryPolicy, max_in_flight: int,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self.policy = policy
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.rng = random.Random(seed)
        self.states = {sid: ShardState(sid) for sid in shard_ids}
        self.ready: deque[str] = deque(shard_ids)  # may start now
        self.backing_off: list[tuple[float, int, str]] = []  # heap of (not_before, seq, shard)
        self._seq = 0
        self.in_flight: dict[str, set[str]] = {}  # worker -> shard ids
        self.done: set[str] = set()
        self.failed: dict[str, Any] = {}  # shard id -> last error
        self.alone: deque[str] = deque()  # ready shards that must run alone on a worker
        self.running_alone: set[str] = set()
        self.replaced: dict[str, list[str]] = {}  # shard id -> the pieces that replaced it

    # ----------------------------------------------------------------- workers

    def add_worker(self, worker: str) -> None:
        self.in_flight.setdefault(worker, set())

    def remove_worker(self, worker: str, reason: Any) -> list[str]:
        """A worker died: its in-flight shards count an attempt and go back to the queue."""
        lost = self.take_worker(worker)
        for sid in lost:
            self._retry_or_fail(sid, worker, reason, transient=True)
        return lost

    def take_worker(self, worker: str) -> list[str]:
        """A worker died: its in-flight shards, for the caller to settle one by one
        (``retry``, ``run_alone``, ``replace`` or ``fail``)."""
        lost = sorted(self.in_flight.pop(worker, set()))
        self.running_alone.difference_update(lost)
        return lost

    def retry(self, sid: str, worker: str, error: Any, transient: bool = True) -> bool:
        """As after any failure: back off and retry while attempts remain, else fail."""
        return self._retry_or_fail(sid, worker, error, transient)

    def run_alone(self, sid: str, error: Any) -> None:
        """Retry ``sid`` alone on a worker, at once, whatever its attempts so far (the caller
        bounds these retries: retry.max_split_attempts)."""
        self.states[sid].errors.append(error)
        self.alone.append(sid)

    def replace(self, sid: str, pieces: list[str], alone: bool, error: Any) -> None:
        """``sid`` is settled by ``pieces`` (new shard ids), queued at the front."""
        self.states[sid].errors.append(error)
        self.replaced[sid] = list(pieces)
        for piece in pieces:
            self.states[piece] = ShardState(piece)
        (self.alone if alone else self.ready).extendleft(reversed(pieces))

    def fail(self, sid: str, error: Any) -> None:
        self.states[sid].errors.append(error)
        self.failed[sid] = error

    @property
    def workers(self) -> list[str]:
        return list(self.in_flight)

    # ----------------------------------------------------------------- assignment

    def assignments(self, starting: int = 0) -> list[tuple[str, str, int]]:
        """(worker, shard, attempt) for every free slot that a ready shard can fill.

        ``starting``: workers still starting. A shard queued behind a busy worker's (the
        second of ``max_in_flight``) is only given while more shards wait than there are idle
        or starting workers to take them: two shards and two workers, the second one still
        starting, must not both go to the first."""
        out = []
        self._promote(self.clock())
        order = sorted(self.in_flight, key=lambda w: len(self.in_flight[w]))
        idle = sum(1 for w in order if not self.in_flight[w])
        # A shard waiting to run alone needs an empty worker: the least busy one takes no new
        # shards until it is empty (else it could wait until the queue runs dry).
        draining = order[0] if self.alone and order and self.in_flight[order[0]] else None
        for worker in order:
            if self.alone and not self.in_flight[worker]:
                sid = self.alone.popleft()
                self.states[sid].attempts += 1
                self.in_flight[worker].add(sid)
                self.running_alone.add(sid)
                out.append((worker, sid, self.states[sid].attempts))
                continue
            if self.in_flight[worker] & self.running_alone or worker == draining:
                continue  # nothing beside a shard that runs alone
            if not self.in_flight[worker]:
                idle -= 1  # this one is served now
            while self.ready and len(self.in_flight[worker]) < self.max_in_flight:
                if self.in_flight[worker] and len(self.ready) <= idle + starting:
                    break  # leave the rest to workers with nothing to do
                sid = self._pick(worker)
                if sid is None:
                    break
                state = self.states[sid]
                state.attempts += 1
                self.in_flight[worker].add(sid)
                out.append((worker, sid, state.attempts))
        return out

    def _promote(self, now: float) -> None:
        while self.backing_off and self.backing_off[0][0] <= now:
            self.ready.append(heapq.heappop(self.backing_off)[2])

    def _pick(self, worker: str) -> str | None:
        """The first ready shard, except one that failed on this worker while another worker
        has a free slot for it. Only retried shards are ever skipped, so the scan is short."""
        skipped: list[str] = []
        chosen = None
        while self.ready and len(skipped) < PICK_SCAN:
            sid = self.ready.popleft()
            if self.states[sid].last_worker != worker or len(self.in_flight) == 1:
                chosen = sid
                break
            skipped.append(sid)
        if chosen is None and skipped and not self._others_free(worker):
            chosen = skipped.pop(0)
        self.ready.extendleft(reversed(skipped))
        return chosen

    def _others_free(self, worker: str) -> bool:
        return any(len(shards) < self.max_in_flight
                   for w, shards in self.in_flight.items() if w != worker)

    # ----------------------------------------------------------------- outcomes

    def succeeded(self, worker: str, sid: str) -> None:
        self.in_flight.get(worker, set()).discard(sid)
        self.running_alone.discard(sid)
        self.done.add(sid)

    def shard_failed(self, worker: str, sid: str, error: Any, transient: bool) -> bool:
        """Record a failure; True when the shard will be tried again."""
        self.in_flight.get(worker, set()).discard(sid)
        self.running_alone.discard(sid)
        return self._retry_or_fail(sid, worker, error, transient)

    def call_ended(self, worker: str, sid: str) -> None:
        """A call returned with an outcome the caller settles itself (``replace``, ...)."""
        self.in_flight.get(worker, set()).discard(sid)
        self.running_alone.discard(sid)

    def _retry_or_fail(self, sid: str, worker: str, error: Any, transient: bool) -> bool:
        state = self.states[sid]
        state.errors.append(error)
        state.last_worker = worker
        if sid in self.done:
            return False
        if transient and state.attempts < self.policy.max_attempts:
            state.not_before = self.clock() + self.policy.delay(state.attempts, self.rng)
            self._seq += 1
            heapq.heappush(self.backing_off, (state.not_before, self._seq, sid))
            return True
        self.failed[sid] = error
        return False

    # ----------------------------------------------------------------- progress

    def finished(self) -> bool:
        return not self.ready and not self.alone and not self.backing_off and \
            not any(self.in_flight.values())

    def wait_hint(self) -> float:
        """Seconds until the earliest queued shard may start (0 if one is ready now)."""
        if self.ready or self.alone:
            return 0.0
        if not self.backing_off:
            return 1.0
        return max(0.0, self.backing_off[0][0] - self.clock())

    def remaining(self) -> int:
        """Shards not finished yet: ready, backing off or in flight."""
        return len(self.ready) + len(self.alone) + len(self.backing_off) + self.in_flight_count()

    def in_flight_count(self) -> int:
        return sum(len(v) for v in self.in_flight.values())

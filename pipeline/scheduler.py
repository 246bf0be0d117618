"""Scheduling policy, free of Ray: one queue, an in-flight cap per worker, retry with backoff.

Fast workers take more shards because every free slot pulls from the same queue. A retried
shard waits (exponential backoff with jitter) and prefers a worker other than the one it
failed on. The runner feeds events in and executes the assignments that come out.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ShardState:
    id: str
    attempts: int = 0
    not_before: float = 0.0
    last_worker: str | None = None
    errors: list[str] = field(default_factory=list)


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
        self.queue: deque[str] = deque(shard_ids)
        self.in_flight: dict[str, set[str]] = {}  # worker -> shard ids
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}  # shard id -> last error

    # ----------------------------------------------------------------- workers

    def add_worker(self, worker: str) -> None:
        self.in_flight.setdefault(worker, set())

    def remove_worker(self, worker: str, reason: str) -> list[str]:
        """A worker died: its in-flight shards count an attempt and go back to the queue."""
        lost = sorted(self.in_flight.pop(worker, set()))
        for sid in lost:
            self._retry_or_fail(sid, worker, reason, transient=True)
        return lost

    @property
    def workers(self) -> list[str]:
        return list(self.in_flight)

    # ----------------------------------------------------------------- assignment

    def assignments(self) -> list[tuple[str, str, int]]:
        """(worker, shard, attempt) for every free slot that a ready shard can fill."""
        out = []
        now = self.clock()
        for worker in sorted(self.in_flight, key=lambda w: len(self.in_flight[w])):
            while len(self.in_flight[worker]) < self.max_in_flight:
                sid = self._pick(worker, now)
                if sid is None:
                    break
                state = self.states[sid]
                state.attempts += 1
                self.in_flight[worker].add(sid)
                out.append((worker, sid, state.attempts))
        return out

    def _pick(self, worker: str, now: float) -> str | None:
        fallback = None
        for sid in self.queue:
            state = self.states[sid]
            if state.not_before > now:
                continue
            if state.last_worker != worker or len(self.in_flight) == 1:
                self.queue.remove(sid)
                return sid
            fallback = fallback or sid
        others_free = any(len(shards) < self.max_in_flight
                          for w, shards in self.in_flight.items() if w != worker)
        if fallback is None or others_free:
            return None  # leave a retried shard for a worker it has not failed on
        self.queue.remove(fallback)
        return fallback

    # ----------------------------------------------------------------- outcomes

    def succeeded(self, worker: str, sid: str) -> None:
        self.in_flight.get(worker, set()).discard(sid)
        self.done.add(sid)

    def shard_failed(self, worker: str, sid: str, error: str, transient: bool) -> bool:
        """Record a failure; True when the shard will be tried again."""
        self.in_flight.get(worker, set()).discard(sid)
        return self._retry_or_fail(sid, worker, error, transient)

    def _retry_or_fail(self, sid: str, worker: str, error: str, transient: bool) -> bool:
        state = self.states[sid]
        state.errors.append(error)
        state.last_worker = worker
        if sid in self.done:
            return False
        if transient and state.attempts < self.policy.max_attempts:
            state.not_before = self.clock() + self.policy.delay(state.attempts, self.rng)
            self.queue.append(sid)
            return True
        self.failed[sid] = error
        return False

    # ----------------------------------------------------------------- progress

    def finished(self) -> bool:
        return not self.queue and not any(self.in_flight.values())

    def wait_hint(self) -> float:
        """Seconds until the earliest queued shard may start (0 if one is ready now)."""
        if not self.queue:
            return 1.0
        now = self.clock()
        return max(0.0, min(self.states[s].not_before for s in self.queue) - now)

    def remaining(self) -> int:
        """Shards not finished yet: queued (waiting or backing off) or in flight."""
        return len(self.queue) + self.in_flight_count()

    def in_flight_count(self) -> int:
        return sum(len(v) for v in self.in_flight.values())

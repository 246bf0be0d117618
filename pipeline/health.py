"""When a run gives up on its workers, or on itself: pure rules over counts and times.

- Workers that keep dying without committing a shard (a poison environment, a node that
  kills every actor) abort the run rather than restart forever; losing one whole node's
  actors at once does not.
- No worker ready within ``workers.start_timeout_s`` while some are still starting (the
  cluster lacks the resources asked for) aborts the run; the clock restarts whenever every
  ready worker is gone.
- A worker whose oldest call has gone unanswered for longer than its queue could take
  (``retry.shard_timeout_s`` x ``workers.max_in_flight``: calls queue inside the actor) is
  hung: the runner kills it and its shards go to the others.

Free of Ray and clocks of their own, so they are tested with plain numbers and a fake clock;
the runner feeds them what it sees.
"""

from __future__ import annotations

from collections.abc import Iterable

# Worker deaths without a committed shard in between that a run survives, on top of twice the
# largest pool it had: a whole node lost at once, and its replacements lost again, is no abort.
SPARE_DEATHS = 3


def too_many_deaths(deaths_since_success: int, most_actors: int) -> bool:
    """Whether workers died so often without progress that the run should stop."""
    return deaths_since_success > 2 * most_actors + SPARE_DEATHS


class StartWatch:
    """Measures how long the run has had no ready worker (from its start, or from the moment
    its last ready worker was lost)."""

    def __init__(self, now: float) -> None:
        self.workless_since: float | None = now

    def update(self, ready_workers: int, now: float) -> None:
        if ready_workers:
            self.workless_since = None
        elif self.workless_since is None:  # every ready worker is gone: the clock restarts
            self.workless_since = now

    def expired(self, starting_workers: int, now: float, limit_s: float) -> bool:
        """No worker ready for longer than ``limit_s`` while some are still starting."""
        return (self.workless_since is not None and starting_workers > 0
                and now - self.workless_since > limit_s)


def hung_workers(calls: Iterable[tuple[str, float]], now: float, shard_timeout_s: float,
                 max_in_flight: int) -> set[str]:
    """Workers with a call (worker, dispatched at) older than their whole queue may take."""
    limit = shard_timeout_s * max_in_flight
    return {worker for worker, dispatched in calls if now - dispatched > limit}

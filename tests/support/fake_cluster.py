"""An ``ActorBackend`` without a cluster, for the runner's and the actor pool's policy tests.

Actors are names; a worker is ready as soon as the test lets its ready call resolve, and each
call resolves to what ``on_submit`` says (default: the shard commits, one row); a call for
which it says None never returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.actor_pool import CallResult, Done
from pipeline.plan import Shard
from pipeline.pools import PoolPlan
from pipeline.state import ShardResult, WorkerFigures
from tests.support.records import marker_for


def committed(handle: str, shard: Shard, attempt: int) -> CallResult:
    """The call commits the shard."""
    worker = handle.removeprefix("actor:")
    return Done(ShardResult(marker=marker_for(shard.id, attempt=attempt, worker=worker,
                                              rows_in=1, rows_out=1)))


class FakeActors:
    def __init__(self, free: dict[str, float] | None = None,
                 total: dict[str, float] | None = None, ready_at_once: bool = True,
                 on_submit: Callable[[str, Shard, int], CallResult | None] = committed) -> None:
        self.free = dict(free if free is not None else {"CPU": 4.0})
        self.total = dict(total if total is not None else self.free)
        self.ready_at_once = ready_at_once
        self.on_submit = on_submit
        self.results: dict[Any, CallResult] = {}  # refs that have a result now
        self.started: list[tuple[str, str]] = []  # (pool, worker id)
        self.submitted: list[tuple[str, str, int]] = []  # (worker id, shard id, attempt)
        self.killed: list[str] = []
        self.requests: list[list[dict[str, float]]] = []

    @staticmethod
    def ready_figures(wid: str) -> WorkerFigures:
        return WorkerFigures(worker=wid, pool=wid.split("-")[0], provider="cpu")

    def ready(self, wid: str, result: CallResult | None = None) -> None:
        """Let worker ``wid`` answer its ready call (with ``result``, default: ready)."""
        self.results[f"ready:{wid}"] = result or Done(self.ready_figures(wid))

    def start(self, pool: PoolPlan, worker_id: str) -> tuple[Any, Any]:
        self.started.append((pool.name, worker_id))
        if self.ready_at_once:
            self.ready(worker_id)
        return f"actor:{worker_id}", f"ready:{worker_id}"

    def submit(self, handle: Any, shard: Shard, attempt: int) -> Any:
        ref = f"call:{len(self.submitted)}"
        self.submitted.append((handle.removeprefix("actor:"), shard.id, attempt))
        result = self.on_submit(handle, shard, attempt)
        if result is not None:
            self.results[ref] = result
        return ref

    def wait(self, refs: list[Any], timeout_s: float) -> list[Any]:
        """The oldest result among ``refs``, as a cluster answers what finished first."""
        waiting = set(refs)
        return [r for r in self.results if r in waiting][:1]

    def result(self, ref: Any) -> CallResult:
        return self.results.pop(ref)

    def kill(self, handle: Any) -> None:
        self.killed.append(handle.removeprefix("actor:"))

    def free_resources(self) -> dict[str, float]:
        return dict(self.free)

    def total_resources(self) -> dict[str, float]:
        return dict(self.total)

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        self.requests.append(bundles)

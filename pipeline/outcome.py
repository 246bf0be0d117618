"""What one run of the dispatch loop produced: the runner builds it, the report reads it.

Plain records, free of Ray, so the report (and its tests) never load the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.state import ShardMarker, WorkerFigures


@dataclass(frozen=True)
class AttemptError:
    """One failed attempt of a shard: the error's type and its one-line message."""

    type: str  # the exception's class name (ShardError, TransientError, DeviceError, ...) or
    message: str  # WorkerLost when the worker process went away
    device: bool = False  # a DeviceError: the session or its device broke, not the data


WORKER_LOST = "WorkerLost"


@dataclass
class RunOutcome:
    markers: dict[str, ShardMarker] = field(default_factory=dict)  # committed in this run
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error message
    attempts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[AttemptError]] = field(default_factory=dict)
    workers: list[WorkerFigures] = field(default_factory=list)  # every worker, as it ended
    actor_deaths: int = 0
    aborted: str | None = None
    notes: list[str] = field(default_factory=list)
    # Seconds since the epoch at which the first worker was ready (its session loaded).
    first_worker_at: float | None = None
    # Shards cut to isolate rows that kill workers (pipeline.isolation): root -> its pieces,
    # and the single rows dead-lettered that way (sub-shard -> why).
    splits: dict[str, list[str]] = field(default_factory=dict)
    isolated_rows: dict[str, str] = field(default_factory=dict)

    @property
    def device_errors(self) -> int:
        return sum(e.device for errors in self.errors.values() for e in errors)

"""The driver's dispatch loop: shards to ready workers, results back, until all are settled.

The runner moves shard descriptors and small records; it never touches row data and knows
nothing about ONNX. Its policies live elsewhere, as plain code tested without a cluster:
which shard goes where and when to retry (``scheduler``), the actors of each pool and the
autoscaler (``actor_pool`` over ``pools``), when to give up (``health``). The cluster is
an ``ActorBackend`` (``ray_backend.RayActors`` in a job).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from pipeline import health
from pipeline.actor_pool import ActorBackend, ActorPool, Done, Failed, Gone, WorkerState
from pipeline.errors import DeviceError, OutOfMemory, PipelineError
from pipeline.isolation import Isolation, Verdict, root_of
from pipeline.locality import Placement
from pipeline.metrics import JobMetrics
from pipeline.outcome import WORKER_LOST, AttemptError, RunOutcome
from pipeline.plan import Shard
from pipeline.pools import pool_plans
from pipeline.redaction import scrub
from pipeline.scheduler import RetryPolicy, Scheduler
from pipeline.spec import JobSpec
from pipeline.state import ShardResult, WorkerFigures

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    def commit(self, rows: int) -> None: ...
    def shard_failed(self) -> None: ...
    def tick(self) -> None: ...


class NoProgress:
    def commit(self, rows: int) -> None:
        pass

    def shard_failed(self) -> None:
        pass

    def tick(self) -> None:
        pass


class Runner:
    """Runs ``shards`` of one job on the workers ``backend`` starts; ``run()`` returns what
    happened (``RunOutcome``)."""

    def __init__(self, spec: JobSpec, shards: list[Shard], backend: ActorBackend,
                 progress: ProgressSink | None = None, placement: Placement | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 stop: Callable[[], str | None] | None = None) -> None:
        self.spec = spec
        self.shards = {s.id: s for s in shards}
        self.backend = backend
        self.progress = progress or NoProgress()
        self.placement = placement or Placement()
        self.clock = clock
        self.stop = stop  # why the job must stop now (its output lease was lost), or None
        plans = pool_plans(spec)
        self.pool = ActorPool(plans, backend, autoscale=not self.placement.pin_node, clock=clock)
        self.metrics = JobMetrics(spec.name, [p.name for p in plans])
        retry = spec.retry
        self.scheduler = Scheduler([s.id for s in shards], RetryPolicy(
            retry.max_attempts, retry.backoff_s, retry.max_backoff_s),
            spec.workers.max_in_flight, clock=clock)
        self.outcome = RunOutcome()
        self.isolation = Isolation(shards, retry.max_split_attempts)
        self._root_rows: dict[str, int | None] = {}
        self.start_watch = health.StartWatch(clock())
        self._deaths_since_success = 0
        self._secrets = (spec.input.storage_options, spec.input.catalog, spec.output.catalog,
                         spec.model.storage_options,
                         spec.output.storage_options)

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunOutcome:
        self._warn_missing_gpus()
        try:
            self.pool.grow(self.scheduler.remaining(), force=True)
            while not self.scheduler.finished() and not self.outcome.aborted:
                self.step()
        finally:
            self.metrics.finish()
            self.pool.shutdown()
        return self._finish()

    def step(self) -> None:
        """One pass: grow the pools, send shards, take one result, check the clocks."""
        self.pool.grow(self.scheduler.remaining())
        for wid, sid, attempt in self.scheduler.assignments(self.pool.starting_count()):
            ref = self.backend.submit(self.pool.workers[wid].handle, self.shards[sid], attempt)
            self.pool.add_call(wid, ref, sid)
        self._collect()
        self._check_health()
        self.progress.tick()
        self.metrics.tick(self.pool.in_flight_by_pool)
        if self.spec.retry.fail_fast and self.scheduler.failed:
            self.outcome.aborted = "retry.fail_fast: a shard failed after all attempts"
        if self.stop is not None and (why := self.stop()):
            self.outcome.aborted = why

    def _collect(self) -> None:
        waiting = self.pool.refs()
        hint = self.scheduler.wait_hint()
        if not waiting:
            time.sleep(min(0.5, max(0.05, hint)))
            return
        for ref in self.backend.wait(waiting, min(0.5, hint or 0.5)):
            self.on_result(ref)

    def on_result(self, ref: object) -> None:
        """A ref has its result: a starting worker is ready (or failed to start), or a shard's
        call returned, raised, or lost its worker."""
        starting = self.pool.starting_with(ref)
        if starting is not None:
            self._worker_answered(starting.id, ref)
        else:
            self._shard_answered(ref)

    # ------------------------------------------------------------------ workers

    def _worker_answered(self, wid: str, ref: object) -> None:
        result = self.backend.result(ref)
        if isinstance(result, Done):
            self._worker_ready(wid, result.value)
            return
        if isinstance(result, Gone) and result.unschedulable and self.placement.pin_node:
            # The one node the job may use cannot hold the actor.
            self.outcome.aborted = (f"workers cannot be placed on the driver's node "
                                    f"({self._resources_text()})")
        self._worker_lost(wid, result.text if isinstance(result, Failed) else result.reason)

    def _worker_ready(self, wid: str, figures: WorkerFigures) -> None:
        record = self.pool.mark_ready(wid, figures)
        if record is None:
            return
        if self.outcome.first_worker_at is None:
            self.outcome.first_worker_at = time.time()
        if figures.fallback:
            self.metrics.worker_fallback(record.pool, record.plan.settings.providers[0],
                                         figures.provider or "?")
        self.scheduler.add_worker(wid)

    def _worker_lost(self, wid: str, reason: str, counted: bool = True) -> None:
        """A worker is gone; ``counted``: its death counts toward giving up (a death that
        isolation blamed on a row does not)."""
        record = self.pool.remove(wid)
        if record is None:
            return
        reason = scrub(reason, *self._secrets)
        self.outcome.actor_deaths += 1
        self._deaths_since_success += int(counted)
        log.warning("worker %s lost: %s", wid, reason)
        error = AttemptError(WORKER_LOST, f"worker lost: {reason}")
        for sid in self.scheduler.remove_worker(wid, error):
            if sid in self.scheduler.failed:
                self.metrics.shard_failed(record.pool)
            elif sid not in self.scheduler.done:
                self.metrics.shard_retried(record.pool)
        if health.too_many_deaths(self._deaths_since_success, self.pool.most_actors):
            self.outcome.aborted = f"workers keep dying without committing a shard: {reason}"
            return
        self.pool.grow_soon()  # a replacement starts on the next pass of the loop

    # ------------------------------------------------------------------ shards

    def _shard_answered(self, ref: object) -> None:
        taken = self.pool.take_call(ref)
        if taken is None:  # its worker was lost meanwhile: the shard is requeued already
            return
        record, sid, sent = taken
        result = self.backend.result(ref)
        if isinstance(result, Failed):
            self._shard_failed(record.id, record.pool, sid, result)
        elif isinstance(result, Gone):  # the actor, its node or its process is gone: requeue
            self._worker_died(record.id, result)
        else:
            self._shard_done(record.id, sid, result.value, self.clock() - sent)

    def _worker_died(self, wid: str, gone: Gone) -> None:
        """A call's worker died under it. Deaths that may be a row's doing settle its shards
        through the isolation policy (alone, halves, dead letters); the rest requeue."""
        if self.isolation.max_split_attempts == 0 or gone.kind not in ("process", "memory") \
                or self.isolation.is_burst(self.clock()):
            self._worker_lost(wid, gone.reason)
            return
        lost = self.scheduler.take_worker(wid)
        reason = scrub(gone.reason, *self._secrets)
        error = AttemptError(WORKER_LOST, f"worker lost: {reason}")
        for shard_id in lost:
            verdict = self.isolation.after_death(self.shards[shard_id], len(lost) == 1,
                                                 gone.kind, reason, self._rows_of(shard_id))
            self._settle(wid, shard_id, verdict, error)
        self._worker_lost(wid, gone.reason, counted=False)

    def _settle(self, wid: str, sid: str, verdict: Verdict, error: AttemptError) -> None:
        if verdict.action == "retry":
            self.scheduler.retry(sid, wid, error)
        elif verdict.action == "isolate":
            self.scheduler.run_alone(sid, error)
        elif verdict.action == "fail":
            self.scheduler.fail(sid, AttemptError(error.type, verdict.message))
            self.progress.shard_failed()
        else:  # split, dead_letter: pieces replace the shard
            self.shards.update({p.id: p for p in verdict.pieces})
            self.scheduler.replace(sid, [p.id for p in verdict.pieces],
                                   alone=verdict.action == "split", error=error)
            root = root_of(sid)
            self.outcome.splits.setdefault(root, []).extend(p.id for p in verdict.pieces)
            for piece in verdict.pieces:
                if piece.dead_letter:
                    self.outcome.isolated_rows[piece.id] = piece.dead_letter
            log.warning("shard %s: %s into %s", sid, verdict.action.replace("_", "-"),
                        ", ".join(p.id for p in verdict.pieces))

    def _rows_of(self, sid: str) -> int | None:
        """The rows of a shard's root: from its footers, or counted once on the cluster."""
        root = root_of(sid)
        if root not in self._root_rows:
            shard = self.isolation.roots[root]
            rows = shard.rows
            if rows is None:
                try:
                    rows = self.backend.count_rows(shard)
                except Exception as exc:  # the shard fails as it would have without isolation
                    log.warning("could not count the rows of shard %s: %s", root, exc)
            self._root_rows[root] = rows
        return self._root_rows[root]

    def _shard_failed(self, wid: str, pool: str, sid: str, result: Failed) -> None:
        cause = result.cause
        if (isinstance(cause, (OutOfMemory, MemoryError)) and
                self.isolation.max_split_attempts > 0):
            self.scheduler.call_ended(wid, sid)
            message = scrub(result.text, *self._secrets)
            verdict = self.isolation.after_memory_error(self.shards[sid], message,
                                                       self._rows_of(sid))
            self._settle(wid, sid, verdict, AttemptError(type(cause).__name__, message))
            return
        transient = bool(getattr(cause, "transient", not isinstance(cause, PipelineError)))
        message = scrub(result.text, *self._secrets)  # it goes into report.json
        error = AttemptError(type(cause).__name__, message, isinstance(cause, DeviceError))
        retry = self.scheduler.shard_failed(wid, sid, error, transient)
        if retry:
            self.metrics.shard_retried(pool)
        else:
            self.progress.shard_failed()
            if sid in self.scheduler.failed:  # not when another attempt committed it
                self.metrics.shard_failed(pool)
        log.warning("shard %s failed on %s (%s): %s", sid, wid,
                    "will retry" if retry else "giving up", message)

    def _shard_done(self, wid: str, sid: str, result: ShardResult, seconds: float) -> None:
        self._deaths_since_success = 0
        self.scheduler.succeeded(wid, sid)
        marker = result.marker
        if result.superseded is not None:  # committed by another attempt first
            self.outcome.notes.append(superseded_note(sid, result))
        if sid in self.outcome.markers:  # counted once, whichever attempt reports it
            return
        self.outcome.markers[sid] = marker
        self.progress.commit(marker.rows_in)
        self.metrics.shard_committed(marker.pool, marker.rows_in, marker.rows_bad, seconds)

    # ------------------------------------------------------------------ clocks and limits

    def _check_health(self) -> None:
        now = self.clock()
        self.start_watch.update(len(self.pool.in_state(WorkerState.READY)), now)
        limit = self.spec.workers.start_timeout_s
        if self.start_watch.expired(len(self.pool.in_state(WorkerState.STARTING)), now, limit):
            self.outcome.aborted = (
                f"no worker started within workers.start_timeout_s={limit:g}s; the cluster "
                f"may lack the resources asked for ({self._resources_text()})")
            return
        timeout = self.spec.retry.shard_timeout_s
        for wid in health.hung_workers(self.pool.calls(), now, timeout,
                                       self.spec.workers.max_in_flight):
            self._worker_lost(wid, f"no result within retry.shard_timeout_s={timeout:g}s")

    def _resources_text(self) -> str:
        text = "; ".join(f"{p.name}: {p.shape} per actor" for p in self.pool.plans)
        if self.placement.pin_node:
            text += ("; node-local input or output keeps workers on the driver's node: use "
                     "object storage or storage.shared_filesystem to use other nodes")
        return text

    def _warn_missing_gpus(self) -> None:
        gpu = next((p for p in self.pool.plans if p.name == "gpu"), None)
        if gpu and self.backend.total_resources().get("GPU", 0) < gpu.shape["GPU"]:
            note = ("workers.gpu: the cluster has no GPU now; GPU workers wait for GPU nodes "
                    "(autoscaler) while the other pools run")
            log.warning(note)
            self.outcome.notes.append(note)

    def _finish(self) -> RunOutcome:
        out = self.outcome
        for sid, state in self.scheduler.states.items():
            out.attempts[sid] = state.attempts
            if state.errors:
                out.errors[sid] = list(state.errors)
        out.failed = {sid: error.message for sid, error in self.scheduler.failed.items()}
        if out.aborted:
            for sid in self.shards:
                if sid not in out.markers and sid not in out.failed and \
                        sid not in self.scheduler.replaced:
                    out.failed[sid] = f"not run: {out.aborted}"
        out.workers = self.pool.retired
        return out


def superseded_note(sid: str, result: ShardResult) -> str:
    """What the report says of an attempt that found its shard committed by another."""
    late, marker = result.superseded, result.marker
    assert late is not None
    if late.published:  # object stores only: it published inside the commit window
        note = (f"shard {sid}: attempt {late.attempt} on {late.worker} published its files "
                f"just as attempt {marker.attempt} committed the shard; its part file may "
                "hold either attempt's rows (to recompute it, delete "
                f"_pipeline/shards/{sid}.json and rerun)")
        log.warning(note)
        return note
    return (f"shard {sid}: attempt {late.attempt} on {late.worker} found it committed by "
            f"attempt {marker.attempt} on {marker.worker}; its own files were discarded")


__all__ = ["NoProgress", "ProgressSink", "Runner", "superseded_note"]

"""The driver side of a job: actor pools, the dispatch loop, dead actors, timeouts.

The runner moves shard descriptors and small stats dicts; it never touches row data and
knows nothing about ONNX. Policy (queue, in-flight cap, retries) lives in ``scheduler``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import ActorUnschedulableError, RayError, RayTaskError

from pipeline.errors import ConfigError, PipelineError
from pipeline.locality import ClusterView, Placement
from pipeline.metrics import JobMetrics
from pipeline.models.shipping import ShippedBundle
from pipeline.plan import Shard
from pipeline.pools import PoolPlan, autoscaler_request, plan_starts, pool_plans, request_changed
from pipeline.redaction import scrub
from pipeline.scheduler import RetryPolicy, Scheduler
from pipeline.spec import JobSpec
from pipeline.worker import ShardWorker

log = logging.getLogger(__name__)
GROW_INTERVAL_S = 1.0  # how often elastic pools look for resources that came free


class ProgressSink(Protocol):
    def commit(self, rows: int) -> None: ...
    def shard_failed(self) -> None: ...
    def tick(self) -> None: ...


class _NoProgress:
    def commit(self, rows: int) -> None:
        pass

    def shard_failed(self) -> None:
        pass

    def tick(self) -> None:
        pass


@dataclass
class WorkerInfo:
    id: str
    pool: str
    handle: Any
    provider: str | None = None
    fallback: str | None = None
    identity: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    session: dict[str, Any] | None = None  # how its session runs (threads, graph, batch sizes)


@dataclass
class RunOutcome:
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    actor_deaths: int = 0
    aborted: str | None = None
    notes: list[str] = field(default_factory=list)
    # Seconds since the epoch at which the first worker was ready (its session loaded).
    first_worker_at: float | None = None


def start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address/RAY_ADDRESS {address}: cannot connect to Ray "
                          f"({' '.join(str(exc).split())[:200]})") from None


def cluster_view() -> ClusterView:
    """How many nodes the connected cluster has and which one the driver is on."""
    from ray.util.client import ray as client_ray

    if client_ray.is_connected():
        return ClusterView(nodes=len([n for n in ray.nodes() if n["Alive"]]), driver_node=None,
                           remote_driver=True)
    alive = [n for n in ray.nodes() if n["Alive"]]
    return ClusterView(nodes=len(alive), driver_node=ray.get_runtime_context().get_node_id())


class Runner:
    def __init__(self, spec: JobSpec, fingerprint: str, read_columns: list[str],
                 shards: list[Shard], progress: ProgressSink | None = None,
                 placement: Placement | None = None,
                 shipped_bundle: ShippedBundle | None = None, bundle_identity: str | None = None):
        self.spec = spec
        self.bundle_identity = bundle_identity
        self.placement = placement or Placement()
        self.shipped_bundle = shipped_bundle
        self.pools = pool_plans(spec)
        self.fingerprint = fingerprint
        self.read_columns = read_columns
        self.shards = {s.id: s for s in shards}
        self.progress = progress or _NoProgress()
        self.metrics = JobMetrics(spec.name, [p.name for p in self.pools])
        self._storage_options = (spec.input.storage_options, spec.model.storage_options,
                                 spec.output.storage_options)
        retry = spec.retry
        self.scheduler = Scheduler(
            [s.id for s in shards],
            RetryPolicy(retry.max_attempts, retry.backoff_s, retry.max_backoff_s),
            spec.workers.max_in_flight,
        )
        self.workers: dict[str, WorkerInfo] = {}
        self.refs: dict[Any, tuple[str, str, float]] = {}
        self.info_refs: dict[Any, str] = {}
        self.outcome = RunOutcome()
        self._seq = 0
        self._deaths_since_success = 0
        self._retired: list[dict[str, Any]] = []
        self._pool_of: dict[str, PoolPlan] = {}
        self._starting: dict[str, float] = {}  # worker -> when it was asked to start
        self._most_actors = 0  # the largest pool size so far: losing a whole node is no abort
        self._workless_since = time.monotonic()  # since when no worker is ready (None: one is)
        self._next_grow = 0.0
        self._requested: list[dict[str, float]] | None = None  # last autoscaler request

    # ------------------------------------------------------------------ actors

    def _runtime_env(self) -> dict[str, Any] | None:
        faults = os.environ.get("PIPELINE_FAULTS")
        return {"env_vars": {"PIPELINE_FAULTS": faults}} if faults else None

    def _scheduling_strategy(self) -> Any:
        if self.placement.pin_node:  # node-local data: only the driver's node sees it
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            return NodeAffinitySchedulingStrategy(self.placement.pin_node, soft=False)
        # SPREAD: actors on as many nodes as possible, for I/O bandwidth and so that losing
        # one node loses as few actors as possible.
        return "SPREAD"

    def _start_worker(self, pool: PoolPlan) -> None:
        self._seq += 1
        wid = f"{pool.name}-{self._seq}"
        # Restarts are ours (a fresh actor, shards requeued), never Ray's.
        options: dict[str, Any] = {**pool.actor_options(),
                                   "max_concurrency": self.spec.workers.max_in_flight,
                                   "max_restarts": 0, "max_task_retries": 0,
                                   "scheduling_strategy": self._scheduling_strategy()}
        env = self._runtime_env()
        if env:
            options["runtime_env"] = env
        handle = ray.remote(ShardWorker).options(**options).remote(
            self.spec, self.fingerprint, self.read_columns, pool.settings, self.shipped_bundle,
            self.bundle_identity)
        self.workers[wid] = WorkerInfo(wid, pool.name, handle)
        # Shards go to a worker only once it answers: an actor that cannot be placed
        # (no resources) or cannot load the model never holds shards hostage.
        self.info_refs[handle.info.remote()] = wid
        self._starting[wid] = time.monotonic()
        self._most_actors = max(self._most_actors, len(self.workers))
        self._pool_of[wid] = pool

    def _grow(self, force: bool = False) -> None:
        """Start the actors the pools lack (replacing lost ones, using nodes that joined) and
        keep the autoscaler's request in line with what the elastic pools still want."""
        now = time.monotonic()
        if not force and now < self._next_grow:
            return
        self._next_grow = now + GROW_INTERVAL_S
        remaining = self.scheduler.remaining()
        live = Counter(p.name for p in self._pool_of.values())
        waiting = Counter(self._pool_of[w].name for w in self._starting)
        short = any(p.elastic and p.target(remaining) > live[p.name] for p in self.pools)
        free = ray.available_resources() if short else {}
        for name, count in plan_starts(self.pools, live, waiting, free, remaining).items():
            pool = next(p for p in self.pools if p.name == name)
            for _ in range(count):
                self._start_worker(pool)
        self._request_resources(autoscaler_request(self.pools, remaining))

    def _request_resources(self, bundles: list[dict[str, float]]) -> None:
        if self.placement.pin_node:
            bundles = []  # new nodes could not run these workers
        if not request_changed(self._requested, bundles):
            return
        self._requested = bundles
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception as exc:  # a hint only: without an autoscaler nothing is lost
            log.debug("autoscaler request failed: %s", exc)

    def _worker_lost(self, wid: str, reason: str) -> None:
        info = self.workers.pop(wid, None)
        self._starting.pop(wid, None)
        if info is None:
            return
        reason = scrub(reason, *self._storage_options)
        self.outcome.actor_deaths += 1
        self._deaths_since_success += 1
        log.warning("worker %s lost: %s", wid, reason)
        for ref in [r for r, (w, _, _) in self.refs.items() if w == wid]:
            del self.refs[ref]
        for sid in self.scheduler.remove_worker(wid, f"worker lost: {reason}"):
            if sid in self.scheduler.failed:
                self.metrics.shard_failed(info.pool)
            elif sid not in self.scheduler.done:
                self.metrics.shard_retried(info.pool)
        with contextlib.suppress(Exception):  # already gone
            ray.kill(info.handle, no_restart=True)
        self._retired.append(self._worker_summary(info))
        self._pool_of.pop(wid)
        limit = 2 * self._most_actors + 3
        if self._deaths_since_success > limit:
            self.outcome.aborted = f"workers keep dying without committing a shard: {reason}"
            return
        self._next_grow = 0.0  # a replacement starts on the next pass of the loop

    def _resources_text(self) -> str:
        text = "; ".join(f"{p.name}: {p.shape} per actor" for p in self.pools)
        if self.placement.pin_node:
            text += ("; node-local input or output keeps workers on the driver's node: use "
                     "object storage or storage.shared_filesystem to use other nodes")
        return text

    def _worker_summary(self, info: WorkerInfo) -> dict[str, Any]:
        return {"id": info.id, "pool": info.pool, "worker": info.identity,
                "provider": info.provider, "fallback": info.fallback, "node_id": info.node_id,
                "node_ip": info.node_ip, "session": info.session}

    # ------------------------------------------------------------------ main loop

    def run(self) -> RunOutcome:
        self._warn_missing_gpus()
        try:
            self._grow(force=True)
            while not self.scheduler.finished() and not self.outcome.aborted:
                self._grow()
                self._dispatch()
                self._collect()
                self._check_timeouts()
                self.progress.tick()
                self.metrics.tick(lambda: Counter(self.workers[w].pool for w, _, _ in
                                                  self.refs.values()))
                if self.spec.retry.fail_fast and self.scheduler.failed:
                    self.outcome.aborted = "retry.fail_fast: a shard failed after all attempts"
        finally:
            self.metrics.finish()
            self._shutdown()
        return self._finish()

    def _dispatch(self) -> None:
        for wid, sid, attempt in self.scheduler.assignments():
            ref = self.workers[wid].handle.process.remote(self.shards[sid].to_dict(), attempt)
            self.refs[ref] = (wid, sid, time.monotonic())

    def _collect(self) -> None:
        waiting = list(self.refs) + list(self.info_refs)
        if not waiting:
            time.sleep(min(0.5, max(0.05, self.scheduler.wait_hint())))
            return
        ready, _ = ray.wait(waiting, num_returns=1, timeout=min(0.5, self.scheduler.wait_hint()
                                                                  or 0.5))
        for ref in ready:
            if ref in self.info_refs:
                self._collect_info(ref)
            elif ref in self.refs:
                self._collect_result(ref)

    def _collect_info(self, ref: Any) -> None:
        wid = self.info_refs.pop(ref)
        try:
            info = ray.get(ref)
        except RayTaskError as exc:
            self._worker_lost(wid, _short(exc.cause if exc.cause else exc))
            return
        except ActorUnschedulableError as exc:
            if self.placement.pin_node:  # the one node the job may use cannot hold the actor
                self.outcome.aborted = (f"workers cannot be placed on the driver's node "
                                        f"({self._resources_text()})")
            self._worker_lost(wid, _short(exc))
            return
        except RayError as exc:  # actor died, node died, OOM-killed, runtime env failed
            self._worker_lost(wid, _short(exc))
            return
        self._starting.pop(wid, None)
        if self.outcome.first_worker_at is None:
            self.outcome.first_worker_at = time.time()
        worker = self.workers.get(wid)
        if worker:
            worker.provider, worker.fallback = info["provider"], info["fallback"]
            worker.identity = info["worker"]
            worker.node_id, worker.node_ip = info.get("node_id"), info.get("node_ip")
            worker.session = info.get("session")
            if worker.fallback:
                self.metrics.worker_fallback(worker.pool, self._pool_of[wid].settings.providers[0],
                                             worker.provider)
            self.scheduler.add_worker(wid)

    def _collect_result(self, ref: Any) -> None:
        wid, sid, dispatched = self.refs.pop(ref)
        try:
            marker = ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            transient = bool(getattr(cause, "transient", not isinstance(cause, PipelineError)))
            message = scrub(_short(cause), *self._storage_options)  # it goes into report.json
            retry = self.scheduler.shard_failed(wid, sid, message, transient)
            if not retry:
                self.progress.shard_failed()
            if retry:
                self.metrics.shard_retried(self.workers[wid].pool)
            elif sid in self.scheduler.failed:  # not when another attempt committed it
                self.metrics.shard_failed(self.workers[wid].pool)
            log.warning("shard %s failed on %s (%s): %s", sid, wid,
                        "will retry" if retry else "giving up", message)
            return
        except RayError as exc:  # the actor, its node or its process is gone: requeue
            self._worker_lost(wid, _short(exc))
            return
        self._deaths_since_success = 0
        self.scheduler.succeeded(wid, sid)
        late = marker.pop("superseded", None)
        if late:  # committed by another attempt first: its marker describes the files
            self._note_superseded(sid, late, marker)
        if sid in self.outcome.markers:  # counted once, whichever attempt reports it
            return
        self.outcome.markers[sid] = marker
        self.progress.commit(marker["rows_in"])
        self.metrics.shard_committed(marker.get("pool", "?"), marker["rows_in"],
                                     marker.get("rows_bad", 0), time.monotonic() - dispatched)

    def _note_superseded(self, sid: str, late: dict[str, Any], marker: dict[str, Any]) -> None:
        note = (f"shard {sid}: attempt {late['attempt']} on {late['worker']} found it committed "
                f"by attempt {marker.get('attempt')} on {marker.get('worker')}; its own files "
                "were discarded")
        if late.get("published"):  # object stores only: it published inside the commit window
            note = (f"shard {sid}: attempt {late['attempt']} on {late['worker']} published its "
                    f"files just as attempt {marker.get('attempt')} committed the shard; its "
                    "part file may hold either attempt's rows (to recompute it, delete "
                    f"_pipeline/shards/{sid}.json and rerun)")
            log.warning(note)
        self.outcome.notes.append(note)

    def _check_timeouts(self) -> None:
        limit = self.spec.retry.shard_timeout_s
        now = time.monotonic()
        start_limit = self.spec.workers.start_timeout_s
        if self.scheduler.workers:
            self._workless_since = None
        elif self._workless_since is None:  # every ready worker is gone: the clock restarts
            self._workless_since = now
        if not self.scheduler.workers and self._starting and \
                now - self._workless_since > start_limit:
            self.outcome.aborted = (
                f"no worker started within workers.start_timeout_s={start_limit:g}s; the "
                f"cluster may lack the resources asked for ({self._resources_text()})")
            return
        # In-flight calls queue inside the actor, so the clock of a worker starts at its
        # oldest call; a hung actor is killed and its shards go to the others.
        for wid in {w for w, _, t in self.refs.values() if now - t > limit *
                    self.spec.workers.max_in_flight}:
            self._worker_lost(wid, f"no result within retry.shard_timeout_s={limit:g}s")

    def _warn_missing_gpus(self) -> None:
        gpu = next((p for p in self.pools if p.name == "gpu"), None)
        if gpu and ray.cluster_resources().get("GPU", 0) < gpu.shape["GPU"]:
            note = ("workers.gpu: the cluster has no GPU now; GPU workers wait for GPU nodes "
                    "(autoscaler) while the other pools run")
            log.warning(note)
            self.outcome.notes.append(note)

    def _shutdown(self) -> None:
        self._request_resources([])  # let the autoscaler release what this job asked for
        for info in list(self.workers.values()):
            self._retired.append(self._worker_summary(info))
            with contextlib.suppress(Exception):  # already gone
                ray.kill(info.handle, no_restart=True)
        self.workers.clear()

    def _finish(self) -> RunOutcome:
        out = self.outcome
        for sid, state in self.scheduler.states.items():
            out.attempts[sid] = state.attempts
            if state.errors:
                out.errors[sid] = state.errors
        out.failed = dict(self.scheduler.failed)
        if out.aborted:
            for sid in self.shards:
                if sid not in out.markers and sid not in out.failed:
                    out.failed[sid] = f"not run: {out.aborted}"
        out.workers = self._retired
        return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    # Ray error strings carry tracebacks; the last non-empty line is the cause.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join((lines[-1] if lines else type(exc).__name__).split())[:300]


__all__ = ["RunOutcome", "Runner", "start_ray"]

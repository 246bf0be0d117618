"""Ray, as the driver uses it: connecting, the cluster's shape, and the workers' actors.

The only driver module that talks to Ray's actor and resource API. ``RayActors`` is the
``ActorBackend`` of ``pipeline.actor_pool``: it starts ``ShardWorker`` actors, sends them
shards and turns Ray's exceptions into ``Done`` / ``Failed`` / ``Gone``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import ray
from ray.exceptions import ActorUnschedulableError, RayError, RayTaskError

from pipeline.actor_pool import CallResult, Done, Failed, Gone
from pipeline.errors import ConfigError, one_line
from pipeline.isolation import death_kind
from pipeline.locality import ClusterView, Placement
from pipeline.models.shipping import ShippedBundle
from pipeline.plan import Shard
from pipeline.pools import PoolPlan
from pipeline.shard_rows import count_rows
from pipeline.spec import JobSpec
from pipeline.worker import ShardWorker

log = logging.getLogger(__name__)


def start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address/RAY_ADDRESS {address}: cannot connect to Ray "
                          f"({one_line(exc, 200)})") from exc


def ray_version() -> str:
    return ray.__version__


def ray_job_id() -> str | None:
    """The connected driver's Ray job id (None before connecting)."""
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_job_id()


def cluster_view() -> ClusterView:
    """How many nodes the connected cluster has and which one the driver is on."""
    from ray.util.client import ray as client_ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    if client_ray.is_connected():
        return ClusterView(nodes=len(alive), driver_node=None, remote_driver=True)
    return ClusterView(nodes=len(alive), driver_node=ray.get_runtime_context().get_node_id())


def error_line(exc: BaseException) -> str:
    """Ray error strings carry tracebacks: the last non-empty line is the cause."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return one_line(lines[-1] if lines else type(exc).__name__)


def death_line(text: str) -> str:
    """Ray's words for a worker process's death, without the actor's ids and addresses."""
    start = text.find("The actor is dead because")
    return one_line(text[start:] if start >= 0 else text, 400)


class RayActors:
    """``ShardWorker`` actors of one job on the connected Ray cluster."""

    def __init__(self, spec: JobSpec, fingerprint: str, read_columns: list[str],
                 placement: Placement, shipped_bundle: ShippedBundle | None = None,
                 bundle_identity: str | None = None) -> None:
        self.spec = spec
        self.worker_args = (spec, fingerprint, read_columns)
        self.placement = placement
        self.shipped_bundle = shipped_bundle
        self.bundle_identity = bundle_identity

    def _options(self, pool: PoolPlan) -> dict[str, Any]:
        # Restarts are ours (a fresh actor, shards requeued), never Ray's.
        options: dict[str, Any] = {**pool.actor_options(),
                                   "max_concurrency": self.spec.workers.max_in_flight,
                                   "max_restarts": 0, "max_task_retries": 0,
                                   "scheduling_strategy": self._scheduling_strategy()}
        faults = os.environ.get("PIPELINE_FAULTS")
        if faults:  # the reliability suite's fault injection reaches the workers
            options["runtime_env"] = {"env_vars": {"PIPELINE_FAULTS": faults}}
        return options

    def _scheduling_strategy(self) -> Any:
        if self.placement.pin_node:  # node-local data: only the driver's node sees it
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            return NodeAffinitySchedulingStrategy(self.placement.pin_node, soft=False)
        # SPREAD: actors on as many nodes as possible, for I/O bandwidth and so that losing
        # one node loses as few actors as possible.
        return "SPREAD"

    def start(self, pool: PoolPlan, worker_id: str) -> tuple[Any, Any]:
        handle = ray.remote(ShardWorker).options(**self._options(pool)).remote(
            *self.worker_args, pool.settings, self.shipped_bundle, self.bundle_identity)
        # Shards go to a worker only once it answers: an actor that cannot be placed (no
        # resources) or cannot load the model never holds shards hostage.
        return handle, handle.info.remote()

    def submit(self, handle: Any, shard: Shard, attempt: int) -> Any:
        return handle.process.remote(shard.to_dict(), attempt)

    def wait(self, refs: list[Any], timeout_s: float) -> list[Any]:
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        return ready

    def result(self, ref: Any) -> CallResult:
        try:
            return Done(ray.get(ref))
        except RayTaskError as exc:  # the call raised; the actor lives on
            cause = exc.cause if exc.cause is not None else exc
            return Failed(cause, error_line(cause))
        except ActorUnschedulableError as exc:
            return Gone(error_line(exc), unschedulable=True)
        except RayError as exc:  # actor died, node died, OOM-killed, runtime env failed
            text = " ".join(str(exc).split())
            kind = death_kind(text, bool(getattr(exc, "preempted", False)))
            return Gone(death_line(text) if kind in ("process", "memory") else error_line(exc),
                        kind=kind)

    def count_rows(self, shard: Shard) -> int:
        # No CPU asked: actors may hold every CPU, and a task waiting for one would wait forever.
        counter = ray.remote(num_cpus=0)(count_rows).options(
            scheduling_strategy=self._scheduling_strategy())
        return int(ray.get(counter.remote(shard, self.worker_args[2],
                                          self.spec.input.storage_options, 65536,
                                          self.spec.input.filter)))

    def kill(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(handle, no_restart=True)

    def free_resources(self) -> dict[str, float]:
        return ray.available_resources()

    def total_resources(self) -> dict[str, float]:
        return ray.cluster_resources()

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception as exc:  # a hint only: without an autoscaler nothing is lost
            log.debug("autoscaler request failed: %s", exc)

"""Worker pools: how many actors each pool wants, how many to start now, what to ask the
autoscaler for. Plain functions over plain records, free of Ray, so the policy is tested
without a cluster; the runner feeds in what the cluster reports and starts what comes out.

A pool is either fixed (``replicas: N``: start N, Ray queues what does not fit) or elastic
(``replicas: auto``): it grows as the cluster grants resources, up to ``max_replicas`` and
never past the shards left to run, and one actor always waits for resources while the pool
is short, so the autoscaler sees the demand and a node that joins is used at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.spec import JobSpec


@dataclass(frozen=True)
class PoolSettings:
    """What a worker of a pool is told about its pool: name, providers, intra-op threads."""

    name: str  # "cpu" or "gpu"
    providers: tuple[str, ...]
    threads: int


@dataclass(frozen=True)
class PoolPlan:
    settings: PoolSettings
    shape: dict[str, float]  # Ray resources per actor: {"CPU": 1.0} or {"CPU": 1.0, "GPU": 1.0}
    replicas: int | None  # fixed size; None for an elastic pool
    max_replicas: int | None = None  # bound of an elastic pool (None: only the shards left)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def elastic(self) -> bool:
        return self.replicas is None

    def target(self, remaining_shards: int) -> int:
        """Actors worth having: more than the shards left to run would only load models."""
        bound = self.replicas if self.replicas is not None else self.max_replicas
        return remaining_shards if bound is None else min(bound, remaining_shards)

    def actor_options(self) -> dict[str, float]:
        options = {"num_cpus": self.shape.get("CPU", 0.0)}
        if self.shape.get("GPU"):
            options["num_gpus"] = self.shape["GPU"]
        return options


def pool_plans(spec: JobSpec) -> list[PoolPlan]:
    """The job's pools, GPU first: where both are elastic, GPUs get the CPUs they need first."""
    plans = []
    gpu, cpu = spec.workers.gpu, spec.workers.cpu
    if gpu.replicas != 0:
        plans.append(PoolPlan(PoolSettings("gpu", tuple(spec.providers.gpu), max(1, int(gpu.cpus))),
                              {"CPU": gpu.cpus, "GPU": gpu.gpus}, _fixed(gpu.replicas),
                              gpu.max_replicas))
    if cpu.replicas != 0:
        threads = cpu.threads or max(1, int(cpu.cpus))
        plans.append(PoolPlan(PoolSettings("cpu", tuple(spec.providers.cpu), threads),
                              {"CPU": cpu.cpus}, _fixed(cpu.replicas), cpu.max_replicas))
    return plans


def _fixed(replicas: int | str) -> int | None:
    return None if replicas == "auto" else int(replicas)


def fits(free: dict[str, float], shape: dict[str, float]) -> int:
    """How many actors of ``shape`` the free resources hold (summed over nodes: an estimate;
    an actor that does not fit on any one node just waits, which is harmless)."""
    counts = [math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in shape.items() if v > 0]
    return max(0, min(counts)) if counts else 0


def plan_starts(pools: list[PoolPlan], live: dict[str, int], waiting: dict[str, int],
                free: dict[str, float], remaining_shards: int) -> dict[str, int]:
    """Actors to start now per pool.

    ``live``: actors per pool that are ready or starting; ``waiting``: those of them not yet
    ready; ``free``: the cluster's available resources. Fixed pools start all they lack.
    Elastic pools start what fits, or one actor to wait for resources when none waits yet.
    """
    free = dict(free)
    starts: dict[str, int] = {}
    for pool in pools:
        missing = pool.target(remaining_shards) - live.get(pool.name, 0)
        if missing <= 0:
            continue
        if pool.elastic:
            n = fits(free, pool.shape)
            if n == 0 and waiting.get(pool.name, 0) == 0:
                n = 1
            n = min(n, missing)
        else:
            n = missing
        if n:
            starts[pool.name] = n
            for key, value in pool.shape.items():
                free[key] = max(0.0, free.get(key, 0.0) - n * value)
    return starts


REQUEST_CAP = 1024  # actors per pool asked of the autoscaler at most (no cluster is bigger)


def autoscaler_request(pools: list[PoolPlan], remaining_shards: int) -> list[dict[str, float]]:
    """Resource bundles to ask the autoscaler for: every actor the elastic pools want."""
    bundles: list[dict[str, float]] = []
    for pool in pools:
        if pool.elastic:
            bundles += [dict(pool.shape)] * min(REQUEST_CAP, pool.target(remaining_shards))
    return bundles


def request_changed(sent: list[dict[str, float]] | None, wanted: list[dict[str, float]]) -> bool:
    """Whether to send a new request: the first one, the last (empty) one, or one that moves
    by a tenth; not one per committed shard, which would flood the cluster's control plane."""
    if sent is None or not wanted:
        return sent != wanted
    return abs(len(wanted) - len(sent)) * 10 >= len(sent) or \
        {tuple(sorted(b.items())) for b in wanted} != {tuple(sorted(b.items())) for b in sent}

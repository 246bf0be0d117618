"""The pool policy without a cluster: targets, what fits, probes, autoscaler requests."""

from __future__ import annotations

import pytest

from pipeline.job_file import load_spec
from pipeline.pools import (
    REQUEST_CAP,
    PoolPlan,
    PoolSettings,
    autoscaler_request,
    fits,
    plan_starts,
    pool_plans,
    request_changed,
)

CPU = PoolPlan(PoolSettings("cpu", ("cpu",), 1), {"CPU": 1.0}, replicas=None)
GPU = PoolPlan(PoolSettings("gpu", ("cuda", "cpu"), 2), {"CPU": 2.0, "GPU": 1.0}, replicas=None)


def pool_job(**workers) -> dict:
    return {"input": {"uri": "s3://b/in"}, "model": {"uri": "s3://b/m"}, "task": {"kind": "embed"},
            "output": {"uri": "s3://b/out"}, "workers": workers}


def test_pool_plans_from_the_spec_put_gpus_first():
    spec = load_spec(pool_job(cpu={"replicas": "auto", "max_replicas": 8, "cpus": 2},
                         gpu={"replicas": 2, "gpus": 1, "cpus": 4}))
    gpu, cpu = pool_plans(spec)
    assert (gpu.name, gpu.replicas, gpu.shape) == ("gpu", 2, {"CPU": 4.0, "GPU": 1.0})
    assert (cpu.name, cpu.elastic, cpu.max_replicas, cpu.shape) == ("cpu", True, 8, {"CPU": 2.0})
    assert cpu.settings.threads == 2 and gpu.actor_options() == {"num_cpus": 4.0, "num_gpus": 1.0}


def test_spec_rejects_a_bound_on_a_fixed_pool_and_no_pool_at_all():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="max_replicas applies to replicas: auto only"):
        load_spec(pool_job(cpu={"replicas": 2, "max_replicas": 4}))
    with pytest.raises(ConfigError, match="no worker could run"):
        load_spec(pool_job(cpu={"replicas": 0}))


def test_target_is_bounded_by_max_replicas_and_the_shards_left():
    bounded = PoolPlan(CPU.settings, CPU.shape, replicas=None, max_replicas=4)
    assert bounded.target(100) == 4 and bounded.target(3) == 3
    assert CPU.target(100) == 100 and CPU.target(0) == 0
    fixed = PoolPlan(CPU.settings, CPU.shape, replicas=6)
    assert fixed.target(100) == 6 and fixed.target(2) == 2


def test_fits_counts_whole_actors_of_every_resource():
    assert fits({"CPU": 7.0}, {"CPU": 2.0}) == 3
    assert fits({"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}) == 1
    assert fits({"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}) == 0
    assert fits({}, {"CPU": 1.0}) == 0


def test_elastic_pool_starts_what_fits():
    assert plan_starts([CPU], {}, {}, {"CPU": 3.0}, remaining_shards=10) == {"cpu": 3}
    # Already 3 live: 2 more CPUs came free (a node joined).
    assert plan_starts([CPU], {"cpu": 3}, {}, {"CPU": 2.0}, remaining_shards=10) == {"cpu": 2}


def test_elastic_pool_keeps_one_actor_waiting_for_the_autoscaler():
    # Nothing free and nobody waiting: one actor waits, so the demand is visible.
    assert plan_starts([CPU], {"cpu": 2}, {}, {"CPU": 0.0}, remaining_shards=10) == {"cpu": 1}
    # One waits already: no more until resources appear.
    assert plan_starts([CPU], {"cpu": 3}, {"cpu": 1}, {"CPU": 0.0}, remaining_shards=10) == {}


def test_no_more_actors_than_shards_left_or_the_bound():
    assert plan_starts([CPU], {"cpu": 2}, {}, {"CPU": 16.0}, remaining_shards=3) == {"cpu": 1}
    assert plan_starts([CPU], {"cpu": 3}, {}, {"CPU": 16.0}, remaining_shards=3) == {}
    bounded = PoolPlan(CPU.settings, CPU.shape, replicas=None, max_replicas=2)
    assert plan_starts([bounded], {}, {}, {"CPU": 16.0}, remaining_shards=50) == {"cpu": 2}


def test_fixed_pool_starts_all_it_lacks_even_without_free_resources():
    fixed = PoolPlan(CPU.settings, CPU.shape, replicas=4)
    assert plan_starts([fixed], {"cpu": 1}, {}, {}, remaining_shards=50) == {"cpu": 3}


def test_gpu_pool_takes_its_cpus_before_the_cpu_pool():
    starts = plan_starts([GPU, CPU], {}, {}, {"CPU": 5.0, "GPU": 1.0}, remaining_shards=50)
    assert starts == {"gpu": 1, "cpu": 3}


def test_autoscaler_request_covers_elastic_pools_only():
    fixed = PoolPlan(CPU.settings, CPU.shape, replicas=4)
    bounded_gpu = PoolPlan(GPU.settings, GPU.shape, replicas=None, max_replicas=2)
    assert autoscaler_request([bounded_gpu, fixed], remaining_shards=10) == [GPU.shape] * 2
    assert autoscaler_request([CPU], remaining_shards=3) == [{"CPU": 1.0}] * 3
    assert autoscaler_request([CPU], remaining_shards=0) == []


def test_autoscaler_requests_are_capped_and_not_resent_for_every_shard():
    assert len(autoscaler_request([CPU], remaining_shards=100_000)) == REQUEST_CAP
    sent = [{"CPU": 1.0}] * 100
    assert request_changed(None, sent)
    assert not request_changed(sent, [{"CPU": 1.0}] * 95)  # a few shards finished
    assert request_changed(sent, [{"CPU": 1.0}] * 89)
    assert request_changed(sent, [])  # the job ends: release everything
    assert request_changed(sent, [{"CPU": 1.0}] * 99 + [{"CPU": 2.0, "GPU": 1.0}])

"""infra/cluster.yaml (Ray cluster launcher, AWS): valid for the installed Ray, elastic, one image.

Validated offline against the cluster-launcher JSON schema that ships inside the installed ray
package, and through the same defaults-and-validation step `ray up` runs before it calls AWS.
Each rule is a function that raises ``ClusterMismatch``; bad configs show that each can fail.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from tests.infra.test_image import DOCKERFILE, intended_image

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "infra" / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


class ClusterMismatch(Exception):
    """The cluster config breaks a rule of elastic pipeline clusters."""


def worker_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def check_head_runs_no_shards(config: dict) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    if head.get("resources", {}).get("CPU") != 0:
        raise ClusterMismatch(f"head node type {config['head_node_type']!r} must have resources: {{CPU: 0}} "
                              f"so no shard runs on it; it has {head.get('resources')}")


def check_elastic_workers(config: dict) -> None:
    """Worker types start at zero and can grow; the cluster-wide cap lets each reach its max."""
    workers = worker_types(config)
    if not any(t.get("max_workers", 0) > 0 for t in workers.values()):
        raise ClusterMismatch("no worker type has max_workers > 0: the autoscaler could never add a node")
    for name, node_type in workers.items():
        if node_type.get("min_workers", 0) != 0:
            raise ClusterMismatch(f"worker type {name!r} has min_workers {node_type['min_workers']}: pools "
                                  "are elastic, so nodes start when a job asks for them (min_workers: 0)")
        if node_type.get("max_workers", 0) > config.get("max_workers", 0):
            raise ClusterMismatch(f"worker type {name!r} can never reach max_workers "
                                  f"{node_type['max_workers']}: the cluster-wide max_workers is "
                                  f"{config.get('max_workers')}")
    for key in ("idle_timeout_minutes", "upscaling_speed"):
        if key not in config:
            raise ClusterMismatch(f"{key} is not set: say how fast the cluster grows and shrinks")


def check_one_image(config: dict, image: str) -> None:
    """Head and every worker type run the image that infra/Dockerfile builds."""
    docker = config.get("docker", {})
    images = {"docker.image": docker.get("image"),
              "docker.head_image": docker.get("head_image", docker.get("image")),
              "docker.worker_image": docker.get("worker_image", docker.get("image"))}
    for name, node_type in worker_types(config).items():
        images[f"{name}.docker.worker_image"] = node_type.get("docker", {}).get(
            "worker_image", images["docker.worker_image"])
    wrong = {where: found for where, found in images.items() if found != image}
    if wrong:
        raise ClusterMismatch(f"every node must run {image} (infra/Dockerfile); these differ: {wrong}")


def _gpus_all(options: list[str]) -> bool:
    text = " ".join(options)
    return re.search(r"--gpus(=|\s+)[\"']?all\b", text) is not None


def check_gpu_types(config: dict) -> None:
    """A worker type with GPUs declares them and passes them into the container."""
    gpu_types = {n: t for n, t in worker_types(config).items() if t.get("resources", {}).get("GPU", 0) > 0}
    if not gpu_types:
        raise ClusterMismatch("no worker type declares resources: {GPU: ...}: GPU actors could never start")
    global_options = config.get("docker", {}).get("run_options", [])
    for name, node_type in gpu_types.items():
        options = global_options + node_type.get("docker", {}).get(
            "worker_run_options", config.get("docker", {}).get("worker_run_options", []))
        if not _gpus_all(options):
            raise ClusterMismatch(f"GPU worker type {name!r} does not pass --gpus all to docker run "
                                  f"(its run options: {options}): the container would see no GPU")


def check_documented_commands(text: str) -> None:
    """The header says how to start, submit to and stop the cluster, with job files that exist."""
    for command in ("ray up", "ray job submit --address http://", "--working-dir .", "ray down"):
        if command not in text:
            raise ClusterMismatch(f"the header does not show `{command} ...`")
    for job in re.findall(r"\bjobs/[\w.-]+\.yaml", text):
        if not (REPO / job).exists():
            raise ClusterMismatch(f"the header submits {job}, which does not exist")
    if "s3://" not in text:
        raise ClusterMismatch("the submit example must use object-storage paths (s3://...)")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def image() -> str:
    return intended_image(DOCKERFILE.read_text())


def test_valid_against_the_cluster_launcher_schema_of_installed_ray(config):
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


def test_valid_after_ray_up_fills_in_defaults(config):
    """What `ray up` does before any cloud call: merge the AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_head_runs_no_shards(config):
    check_head_runs_no_shards(config)


def test_worker_types_are_elastic(config):
    check_elastic_workers(config)


def test_every_node_runs_the_dockerfile_image(config, image):
    check_one_image(config, image)


def test_gpu_workers_get_the_gpus(config):
    check_gpu_types(config)


def test_header_documents_the_commands():
    check_documented_commands(CLUSTER_YAML.read_text())


# ------------------------------------------------------------------- each rule can fail


def _bad(config: dict, edit) -> dict:
    changed = copy.deepcopy(config)
    edit(changed)
    return changed


def test_schema_rejects_a_node_type_without_resources(config):
    bad = _bad(config, lambda c: c["available_node_types"]["cpu_workers"].pop("resources"))
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        jsonschema.validate(bad, json.loads(RAY_SCHEMA.read_text()))


def test_head_with_cpus_fails(config):
    bad = _bad(config, lambda c: c["available_node_types"]["head"].update(resources={"CPU": 2}))
    with pytest.raises(ClusterMismatch, match=r"must have resources: \{CPU: 0\}"):
        check_head_runs_no_shards(bad)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["available_node_types"]["cpu_workers"].update(min_workers=2), "min_workers 2"),
    (lambda c: [t.update(max_workers=0) for n, t in c["available_node_types"].items() if n != "head"],
     "no worker type has max_workers > 0"),
    (lambda c: c.update(max_workers=1), "can never reach max_workers"),
    (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes is not set"),
])
def test_non_elastic_workers_fail(config, edit, message):
    with pytest.raises(ClusterMismatch, match=message):
        check_elastic_workers(_bad(config, edit))


def test_other_image_fails(config, image):
    bad = _bad(config, lambda c: c["docker"].update(image="rayproject/ray:2.60.0-py311-cu128"))
    with pytest.raises(ClusterMismatch, match=r"'docker\.image'"):
        check_one_image(bad, image)
    gpu_docker = ("available_node_types", "gpu_workers", "docker")
    bad = _bad(config, lambda c: c[gpu_docker[0]][gpu_docker[1]][gpu_docker[2]].update(worker_image="x:1"))
    with pytest.raises(ClusterMismatch, match=r"'gpu_workers\.docker\.worker_image': 'x:1'"):
        check_one_image(bad, image)


def test_gpu_type_without_gpus_all_fails(config):
    bad = _bad(config, lambda c: c["available_node_types"]["gpu_workers"].pop("docker"))
    with pytest.raises(ClusterMismatch, match="does not pass --gpus all"):
        check_gpu_types(bad)
    bad = _bad(config, lambda c: c["available_node_types"]["gpu_workers"]["resources"].pop("GPU"))
    with pytest.raises(ClusterMismatch, match="no worker type declares"):
        check_gpu_types(bad)


def test_undocumented_or_stale_commands_fail():
    text = CLUSTER_YAML.read_text()
    with pytest.raises(ClusterMismatch, match="ray down"):
        check_documented_commands(text.replace("ray down", "ray stop"))
    with pytest.raises(ClusterMismatch, match=r"jobs/gone\.yaml"):
        check_documented_commands(text.replace("jobs/embed-cluster.yaml", "jobs/gone.yaml"))

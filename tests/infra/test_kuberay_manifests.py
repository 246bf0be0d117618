"""infra/kuberay/: every manifest validates against the KubeRay v1.7.0 CRD schemas (offline, defaults
applied first, unknown fields rejected), the job file in the ConfigMap loads, and the settings the
pipeline relies on hold (autoscaling, replica bounds sized for the job's pools, GPUs, S3 Secret on
every Ray container, a head without CPUs, one image, non-root, retries that rely on resume)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft4Validator

from pipeline.job_file import load_spec
from tests.support.k8s_schema import (
    CORE_KINDS,
    CRD_SCHEMA_FILES,
    SCHEMA_DIR,
    ManifestError,
    apply_defaults,
    check_manifest,
    crd_schema,
    cron_schedule_errors,
    defaulted,
    load_manifests,
    manifest_schema,
    to_json_schema,
    validate_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra" / "kuberay"

IMAGE = "ghcr.io/example/onnx-ray-pipeline:latest"
SECRET = "pipeline-s3-credentials"
CONFIGMAP = "pipeline-jobs"
ENTRYPOINT = "python -m pipeline.run /jobs/embed.yaml --no-progress --wait"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

DOCUMENTS = [
    pytest.param(doc, id=f"{path.name}#{index}:{doc.get('kind')}")
    for path in sorted(INFRA.glob("*.yaml"))
    for index, doc in enumerate(load_manifests(path))
]


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """The raw manifests by kind (one of each)."""
    by_kind: dict[str, dict[str, Any]] = {}
    for param in DOCUMENTS:
        doc = param.values[0]
        assert doc["kind"] not in by_kind, f"two {doc['kind']} manifests in {INFRA}"
        by_kind[doc["kind"]] = doc
    return by_kind


@pytest.fixture(scope="module")
def job_specs(manifests) -> dict[str, dict[str, Any]]:
    """The RayJob specs as the API server stores them (defaults applied): the RayJob's own and the
    RayCronJob's job template."""
    rayjob = check_manifest(manifests["RayJob"], "RayJob")
    cronjob = check_manifest(manifests["RayCronJob"], "RayCronJob")
    return {"RayJob": rayjob["spec"], "RayCronJob.jobTemplate": cronjob["spec"]["jobTemplate"]}


@pytest.fixture(scope="module")
def job_file(manifests) -> dict[str, Any]:
    return yaml.safe_load(manifests["ConfigMap"]["data"]["embed.yaml"])


def pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of the head and of every worker group."""
    out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    out += [(f"worker group {g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    return out


def ray_containers(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) of every container of the head and worker pods."""
    return [
        (f"{where} container {c['name']}", c, pod)
        for where, pod in pods(cluster)
        for c in pod.get("containers", []) + pod.get("initContainers", [])
    ]


def quantity(value: Any) -> float:
    """A Kubernetes CPU/count quantity as a number ("8" -> 8, "500m" -> 0.5, 2 -> 2)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_group(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r} (have {sorted(groups)})"
    return groups[name]


def ray_resources(group: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) Ray sees on one pod of the group: rayStartParams, else the container's limits."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    cpus = quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def fresh(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy to edit: unlike copy.deepcopy, it also unshares YAML aliases (anchors) of the manifest."""
    return json.loads(json.dumps(doc))


def paths(errors) -> list[str]:
    return [e.path for e in errors]


# --- every manifest validates ----------------------------------------------------------------


def test_the_folder_holds_one_manifest_of_each_kind(manifests):
    assert set(manifests) == {"RayJob", "RayCronJob", "ConfigMap", "Secret"}


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_manifest_validates_against_its_schema(doc):
    errors = validate_manifest(doc)
    assert not errors, "\n".join(map(str, errors))


def test_ray_cluster_spec_is_also_a_valid_raycluster(manifests):
    """The embedded cluster would validate as a RayCluster of its own (same CRD generation)."""
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "embed"},
        "spec": manifests["RayJob"]["spec"]["rayClusterSpec"],
    }
    assert validate_manifest(cluster) == []


def test_converted_schemas_are_valid_draft4():
    # RayCluster's schema is the rayClusterSpec inside RayJob's and RayCronJob's (checking those too
    # would only add seconds).
    for kind in ("RayCluster", *CORE_KINDS):
        Draft4Validator.check_schema(manifest_schema(kind))


# --- the job file in the ConfigMap -----------------------------------------------------------


def test_configmap_holds_the_job_file_the_entrypoint_reads(manifests, job_specs):
    configmap = manifests["ConfigMap"]
    assert configmap["metadata"]["name"] == CONFIGMAP
    assert set(configmap["data"]) == {"embed.yaml"}
    for where, spec in job_specs.items():
        assert spec["entrypoint"] == ENTRYPOINT, where
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head["volumes"]}
        mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
        assert "/jobs" in mounts, f"{where}: the head does not mount /jobs"
        assert volumes[mounts["/jobs"]["name"]].get("configMap", {}).get("name") == CONFIGMAP, where


def test_job_file_loads_with_load_spec(job_file):
    spec = load_spec(job_file)  # the dict form: no file, no environment needed
    assert spec.task.kind == "embed" and spec.task.text_column == "text"
    assert spec.passthrough == ["id"]
    assert spec.output.mode == "incremental"  # nightly: only new work
    for name in ("input", "model", "output"):
        uri = getattr(spec, name).uri
        assert uri.startswith("s3://"), f"{name}.uri {uri!r}: a multi-node cluster needs object storage"
    assert spec.storage.shared_filesystem is False
    assert spec.workers.cpu.replicas == "auto" and spec.workers.cpu.max_replicas
    assert spec.workers.gpu.replicas == "auto" and spec.workers.gpu.max_replicas


def test_job_file_holds_no_credentials(manifests, job_file):
    """Credentials come from the Secret through the environment, never from the ConfigMap."""
    assert not re.search(r"AKIA[0-9A-Z]{16}", manifests["ConfigMap"]["data"]["embed.yaml"])
    for section in ("input", "model", "output"):
        assert not job_file[section].get("storage_options"), f"{section}.storage_options: use the Secret"


def test_worker_groups_are_sized_for_the_job_pools(job_specs, job_file):
    workers = load_spec(job_file).workers
    for where, spec in job_specs.items():
        cluster = spec["rayClusterSpec"]
        cpu_group, gpu_group = worker_group(cluster, "cpu"), worker_group(cluster, "gpu")

        cpus_per_pod, gpus_on_cpu_pods = ray_resources(cpu_group)
        assert gpus_on_cpu_pods == 0, where
        actors_per_pod = math.floor(cpus_per_pod / workers.cpu.cpus)
        assert actors_per_pod >= 1, f"{where}: a cpu pod cannot hold one actor of {workers.cpu.cpus} CPUs"
        assert cpu_group["maxReplicas"] == math.ceil(workers.cpu.max_replicas / actors_per_pod), (
            f"{where}: cpu group maxReplicas {cpu_group['maxReplicas']} does not match "
            f"workers.cpu.max_replicas {workers.cpu.max_replicas} at {actors_per_pod} actors per pod")

        cpus_per_gpu_pod, gpus_per_pod = ray_resources(gpu_group)
        assert gpus_per_pod >= workers.gpu.gpus, f"{where}: a gpu pod cannot hold one GPU actor"
        assert cpus_per_gpu_pod >= workers.gpu.cpus, f"{where}: a gpu pod lacks the GPU actor's CPUs"
        gpu_actors_per_pod = min(gpus_per_pod // workers.gpu.gpus, cpus_per_gpu_pod // workers.gpu.cpus)
        assert gpu_group["maxReplicas"] == math.ceil(workers.gpu.max_replicas / gpu_actors_per_pod), where


# --- what the cluster must look like ---------------------------------------------------------


def test_cronjob_runs_the_same_job_as_the_rayjob(manifests):
    rayjob, template = manifests["RayJob"]["spec"], manifests["RayCronJob"]["spec"]["jobTemplate"]
    assert template["entrypoint"] == rayjob["entrypoint"]
    assert template["rayClusterSpec"] == rayjob["rayClusterSpec"], (
        "raycronjob-embed.yaml spec.jobTemplate.rayClusterSpec differs from "
        "rayjob-embed.yaml spec.rayClusterSpec")
    assert template == rayjob, "raycronjob-embed.yaml spec.jobTemplate differs from rayjob-embed.yaml spec"


def test_cronjob_schedule_is_a_valid_five_field_cron(manifests):
    spec = manifests["RayCronJob"]["spec"]
    assert cron_schedule_errors(spec["schedule"]) == []
    assert spec.get("suspend") is not True
    assert spec.get("timeZone", "UTC")  # when set, not empty (KubeRay refuses "")


@pytest.mark.parametrize("schedule", ["0 2 * *", "0 24 * * *", "61 * * * *", "0 2 * * 7", "@daily",
                                      "0 2 */0 * *", "TZ=UTC 0 2 * * *", "0 2 * * MON-XYZ"])
def test_cron_check_rejects_bad_schedules(schedule):
    assert cron_schedule_errors(schedule)


def test_both_clusters_enable_autoscaling(job_specs):
    for where, spec in job_specs.items():
        cluster = spec["rayClusterSpec"]
        assert cluster.get("enableInTreeAutoscaling") is True, where
        assert cluster.get("autoscalerOptions"), f"{where}: no autoscalerOptions"


def test_worker_group_replica_bounds(job_specs):
    for where, spec in job_specs.items():
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            low, start, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
            assert 0 <= low <= start <= high < 2**31 - 1, (
                f"{where} group {group['groupName']}: min {low}, replicas {start}, max {high}")


def test_gpu_group_asks_for_gpus(job_specs):
    for where, spec in job_specs.items():
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            resources = group["template"]["spec"]["containers"][0]["resources"]
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if group["groupName"] != "gpu":
                assert gpus is None, f"{where}: group {group['groupName']} asks for a GPU"
                continue
            assert gpus is not None and quantity(gpus) >= 1, f"{where}: the gpu group asks for no GPU"
            requested = resources.get("requests", {}).get("nvidia.com/gpu", gpus)
            assert requested == gpus, f"{where}: GPU requests must equal limits"


def test_head_runs_no_shards(job_specs):
    for where, spec in job_specs.items():
        head = spec["rayClusterSpec"]["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", where
        # the driver runs on the head: asking for a CPU there would never be granted
        assert not spec.get("entrypointNumCpus") and not spec.get("entrypointNumGpus"), where


def test_every_ray_container_gets_the_s3_secret(job_specs, manifests):
    assert manifests["Secret"]["metadata"]["name"] == SECRET
    for where, spec in job_specs.items():
        for container_where, container, _ in ray_containers(spec["rayClusterSpec"]):
            env_from = container.get("envFrom", [])
            from_env_from = any(e.get("secretRef", {}).get("name") == SECRET for e in env_from)
            key_refs = {
                e["name"] for e in container.get("env", [])
                if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == SECRET
            }
            assert from_env_from or set(S3_KEYS) <= key_refs, f"{where} {container_where}: no {SECRET}"


def test_model_cache_is_on_an_empty_dir(job_specs):
    for where, spec in job_specs.items():
        for container_where, container, pod in ray_containers(spec["rayClusterSpec"]):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            cache = env.get("PIPELINE_CACHE_DIR")
            assert cache, f"{where} {container_where}: PIPELINE_CACHE_DIR is not set"
            mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == cache), None)
            assert mount, f"{where} {container_where}: nothing is mounted at {cache}"
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert "emptyDir" in volume, f"{where} {container_where}: {cache} is not an emptyDir"


def test_every_container_uses_the_same_image(job_specs):
    for where, spec in job_specs.items():
        images = {cw: c["image"] for cw, c, _ in ray_containers(spec["rayClusterSpec"])}
        for c in spec["submitterPodTemplate"]["spec"]["containers"]:
            images[f"submitter container {c['name']}"] = c["image"]
        images["autoscaler"] = spec["rayClusterSpec"]["autoscalerOptions"].get("image", IMAGE)
        assert set(images.values()) == {IMAGE}, f"{where}: {images}"


def test_retries_rely_on_resume(job_specs, job_file):
    # A retry resumes the open run; the next night starts a new one over what changed.
    assert load_spec(job_file).output.mode == "incremental"
    for where, spec in job_specs.items():
        assert spec["backoffLimit"] >= 1, where
        assert spec["submissionMode"] != "InteractiveMode", f"{where}: InteractiveMode allows no retries"
        assert spec["shutdownAfterJobFinishes"] is True, where
        assert spec["ttlSecondsAfterFinished"] > 0, where
        assert spec.get("activeDeadlineSeconds", 1) > 0, where


def test_containers_have_requests_and_limits(job_specs):
    for where, spec in job_specs.items():
        resources = {cw: c.get("resources", {}) for cw, c, _ in ray_containers(spec["rayClusterSpec"])}
        for c in spec["submitterPodTemplate"]["spec"]["containers"]:
            resources[f"submitter container {c['name']}"] = c.get("resources", {})
        resources["autoscaler"] = spec["rayClusterSpec"]["autoscalerOptions"].get("resources", {})
        for container_where, res in resources.items():
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where} {container_where}: {part}"


def test_containers_run_as_non_root(job_specs):
    def effective(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
        return {**pod.get("securityContext", {}), **container.get("securityContext", {})}

    for where, spec in job_specs.items():
        contexts = {cw: effective(pod, c) for cw, c, pod in ray_containers(spec["rayClusterSpec"])}
        submitter = spec["submitterPodTemplate"]["spec"]
        for c in submitter["containers"]:
            contexts[f"submitter container {c['name']}"] = effective(submitter, c)
        contexts["autoscaler"] = spec["rayClusterSpec"]["autoscalerOptions"].get("securityContext", {})
        for container_where, context in contexts.items():
            assert context.get("runAsNonRoot") is True, f"{where} {container_where}"
            assert context.get("runAsUser") == 1000, f"{where} {container_where}"
            assert context.get("allowPrivilegeEscalation") is False, f"{where} {container_where}"
            assert context.get("privileged") is not True, f"{where} {container_where}"


def test_kuberay_operator_rules(job_specs, manifests):
    """A few checks KubeRay's operator makes beyond the CRD schema (utils.ValidateRayClusterSpec)."""
    for where, spec in job_specs.items():
        cluster = spec["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            params = group.get("rayStartParams", {})
            if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                assert not group.get("resources"), f"{where}: resources in both rayStartParams and resources"
            assert "labels" not in params, f"{where}: rayStartParams labels is not supported"
            assert group["template"]["spec"]["containers"], where
    secret = manifests["Secret"]
    assert secret.get("type", "Opaque") == "Opaque"
    assert set(S3_KEYS) <= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    placeholders = all("REPLACE" in secret["stringData"][k] for k in S3_KEYS)
    assert placeholders, "secret-example.yaml must hold placeholders"


# --- the validator: defaults -----------------------------------------------------------------


def test_defaults_are_applied_before_validation(manifests):
    doc = fresh(manifests["RayJob"])
    del doc["spec"]["submissionMode"]
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        del group["minReplicas"], group["maxReplicas"]  # required, but defaulted: valid
    assert validate_manifest(doc) == []
    stored = defaulted(doc)
    assert stored["spec"]["submissionMode"] == "K8sJobMode"
    for group in stored["spec"]["rayClusterSpec"]["workerGroupSpecs"]:  # items of an array
        assert (group["minReplicas"], group["maxReplicas"], group["numOfHosts"]) == (0, 2**31 - 1, 1)
    assert "submissionMode" not in doc["spec"], "defaulting must not change its input"


def test_apply_defaults_follows_the_api_server_rules():
    schema = {
        "type": "object",
        "properties": {
            "mode": {"type": "string", "default": "a"},
            "kept": {"type": "string", "default": "b"},
            "nulled": {"type": "string", "default": "c"},
            "nullable": {"type": "string", "nullable": True, "default": "d"},
            "obj": {"type": "object", "default": {}, "properties": {"inner": {"default": 1}}},
            "absent": {"type": "object", "properties": {"deep": {"type": "integer", "default": 2}}},
            "list": {"type": "array", "items": {"type": "object", "properties": {"x": {"default": 3}}}},
            "map": {"type": "object", "additionalProperties": {"properties": {"y": {"default": 4}}}},
        },
    }
    shared = {}
    value = {"kept": "mine", "nulled": None, "nullable": None, "list": [{}, {"x": 9}], "map": {"k": shared}}
    out = apply_defaults(value, schema)
    assert out == {
        "mode": "a", "kept": "mine", "nulled": "c", "nullable": None,
        "obj": {"inner": 1},                      # a defaulted object gets its own defaults too
        "list": [{"x": 3}, {"x": 9}], "map": {"k": {"y": 4}},
    }                                             # "absent" stays absent: no defaults below it
    assert shared == {} and value["list"] == [{}, {"x": 9}], "the input is not modified"
    out["obj"]["inner"] = 5
    assert schema["properties"]["obj"]["default"] == {}, "defaults are copied"


def test_yaml_aliases_are_unshared_before_defaulting():
    doc = yaml.safe_load("a: &x {}\nb: *x\n")
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"p": {"default": 1}}},
                                               "b": {"type": "object", "properties": {"q": {"default": 2}}}}}
    assert apply_defaults(doc, schema) == {"a": {"p": 1}, "b": {"q": 2}}


# --- the validator: OpenAPI extensions -------------------------------------------------------


def test_openapi_extensions_are_converted():
    converted = to_json_schema({
        "type": "object",
        "properties": {
            "n": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bare": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "rule": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]},
        },
    })
    validator = Draft4Validator(converted)
    valid = {"n": 1, "bare": "50%", "maybe": None, "free": {"a": 1, "other": 2}, "rule": "x"}
    assert validator.is_valid(valid)
    assert not validator.is_valid({"n": 1.5})
    assert not validator.is_valid({"bare": [1]})
    assert not validator.is_valid({"unknown": 1}), "objects with properties are closed"
    assert "x-kubernetes-validations" not in converted["properties"]["rule"], "CEL is not evaluated"


# --- the validator: it fails, and says where -------------------------------------------------


def _rayjob_errors(manifests, edit) -> list:
    doc = fresh(manifests["RayJob"])
    edit(doc["spec"])
    return validate_manifest(doc)


def test_misspelled_field_is_rejected(manifests):
    def edit(spec):
        spec["shutdownAfterJobFinish"] = spec.pop("shutdownAfterJobFinishes")

    errors = _rayjob_errors(manifests, edit)
    assert paths(errors) == ["spec.shutdownAfterJobFinish"]
    assert "unknown field" in errors[0].message


def test_misspelled_field_inside_a_pod_template_is_rejected(manifests):
    def edit(spec):
        container = spec["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
        container["imagePulPolicy"] = container.pop("imagePullPolicy")

    errors = _rayjob_errors(manifests, edit)
    container = "spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0]"
    assert paths(errors) == [f"{container}.imagePulPolicy"]


def test_wrong_type_is_rejected(manifests):
    def edit(spec):
        spec["backoffLimit"] = "two"

    errors = _rayjob_errors(manifests, edit)
    assert paths(errors) == ["spec.backoffLimit"]
    assert "integer" in errors[0].message


def test_missing_required_field_is_rejected(manifests):
    def edit(spec):
        del spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]

    errors = _rayjob_errors(manifests, edit)
    assert paths(errors) == ["spec.rayClusterSpec.headGroupSpec.template.spec.containers"]
    assert "required" in errors[0].message


@pytest.mark.parametrize(("edit", "path"), [
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     'spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus'),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
     ["limits"].update({"cpu": "eight"}),
     "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu"),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update({"maxReplicas": 2**31}),
     "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas"),
    (lambda s: s["rayClusterSpec"]["autoscalerOptions"].update({"upscalingMode": "Fast"}),
     "spec.rayClusterSpec.autoscalerOptions.upscalingMode"),
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"].append(
        {"name": "jobs", "emptyDir": {}}),
     "spec.rayClusterSpec.headGroupSpec.template.spec.volumes[2]"),
], ids=["rayStartParams-int", "quantity", "int32-overflow", "enum", "duplicate-list-map-key"])
def test_invalid_values_are_rejected_with_their_path(manifests, edit, path):
    assert path in paths(_rayjob_errors(manifests, edit))


def test_every_error_is_reported(manifests):
    doc = fresh(manifests["RayJob"])
    doc["metadata"]["name"] = "Embed_Job"
    doc["spec"]["backoffLimit"] = "two"
    doc["spec"]["entrypiont"] = "x"
    with pytest.raises(ManifestError) as info:
        check_manifest(doc, "rayjob-embed.yaml")
    assert paths(info.value.errors) == ["metadata.name", "spec.backoffLimit", "spec.entrypiont"]
    assert "rayjob-embed.yaml: 3 error(s)" in str(info.value)


@pytest.mark.parametrize(("kind", "edit", "path"), [
    ("RayJob", lambda d: d["metadata"].update({"name": "x" * 48}), "metadata.name"),
    ("RayJob", lambda d: d["metadata"].update({"lables": {}}), "metadata.lables"),
    ("RayJob", lambda d: d.update({"apiVersion": "ray.io/v1alpha1"}), "apiVersion"),
    ("RayCronJob", lambda d: d["spec"].pop("schedule"), "spec.schedule"),
    ("RayCronJob", lambda d: d["spec"].update({"timeZone": ""}), "spec.timeZone"),
    ("ConfigMap", lambda d: d["data"].update({"bad key": "x"}), 'data["bad key"]'),
    ("ConfigMap", lambda d: d.update({"dat": {}}), "dat"),
    ("Secret", lambda d: d.update({"data": {"AWS_ACCESS_KEY_ID": "not base64!"}}), "data.AWS_ACCESS_KEY_ID"),
    ("Secret", lambda d: d["metadata"].pop("name"), "metadata.name"),
])
def test_other_kinds_fail_with_their_path(manifests, kind, edit, path):
    doc = fresh(manifests[kind])
    edit(doc)
    assert path in paths(validate_manifest(doc))


def test_unsupported_kind_is_an_error():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    assert paths(validate_manifest(pod)) == ["kind"]


# --- the schema fixtures ---------------------------------------------------------------------


def test_schema_fixtures_are_the_v1_schemas():
    for kind, name in CRD_SCHEMA_FILES.items():
        assert (SCHEMA_DIR / name).is_file(), name
        schema = crd_schema(kind)
        assert schema["type"] == "object" and "spec" in schema["properties"], kind
    assert crd_schema("RayCronJob")["properties"]["spec"]["required"] == ["jobTemplate", "schedule"]

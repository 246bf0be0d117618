"""Job spec: defaults, profiles merged over a job file, overrides, env interpolation, schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import sources
from pipeline.errors import ConfigError
from pipeline.job_file import json_schema, load_spec
from pipeline.redaction import redact
from pipeline.spec import InputSpec

REPO = Path(__file__).resolve().parents[2]


def test_demo_jobs_are_valid_with_defaults():
    embed = load_spec(REPO / "jobs" / "embed.yaml")
    assert embed.task.kind == "embed" and embed.passthrough == ["id", "source"]
    # The demo reruns after `make data` rewrites its input: only what changed is computed.
    assert embed.retry.max_attempts == 3 and embed.output.mode == "incremental"
    assert embed.output.format == "parquet" and embed.output.deleted_inputs == "retire"
    score = load_spec(REPO / "jobs" / "score.yaml")
    assert score.task.kind == "classify" and score.task.label_column == "label"


@pytest.mark.parametrize(("profile", "providers"), [
    ("cpu", None), ("cuda", ["cuda", "cpu"]), ("tensorrt", ["tensorrt", "cuda", "cpu"])])
def test_profiles_merge_over_the_job(profile, providers):
    spec = load_spec([REPO / "jobs" / "embed.yaml", REPO / "configs" / f"{profile}.yaml"])
    assert spec.input.uri == "data/text"  # kept from the job file
    if providers:
        assert spec.providers.gpu == providers and spec.workers.gpu.replicas == 1
        assert spec.workers.cpu.replicas == 0
    else:
        assert spec.workers.cpu.cpus == 4 and spec.workers.gpu.replicas == 0


def test_overrides_and_env(monkeypatch):
    monkeypatch.setenv("OUT_BUCKET", "my-bucket")
    spec = load_spec(
        {"input": {"uri": "in"}, "model": {"uri": "m"}, "task": {"kind": "embed"},
         "output": {"uri": "s3://${OUT_BUCKET}/x", "storage_options": {"secret": "${OUT_BUCKET}"}},
         "name": "${JOB_NAME:-nightly}"},
        ["workers.cpu.replicas=3", "retry.fail_fast=true", "passthrough=[id, url]"])
    assert spec.output.uri == "s3://my-bucket/x" and spec.name == "nightly"
    assert spec.workers.cpu.replicas == 3 and spec.retry.fail_fast is True
    assert spec.passthrough == ["id", "url"]
    assert redact(spec.model_dump())["output"]["storage_options"]["secret"] == "***"


def test_duplicate_passthrough_rejected():
    with pytest.raises(ConfigError, match=r"passthrough: .*unique"):
        load_spec({"input": {"uri": "in"}, "model": {"uri": "m"}, "task": {"kind": "embed"},
                   "output": {"uri": "o"}, "passthrough": ["id", "id"]})


def test_json_schema_lists_top_level_keys():
    schema = json_schema()
    assert {"input", "model", "task", "output", "retry", "bad_rows"} <= set(schema["properties"])
    assert set(schema["required"]) == {"input", "model", "output"}  # task: the bundle's


def test_table_format_without_its_library_is_a_one_line_error(monkeypatch):
    sources.require_library("delta", "output.format")  # the tables extra: no error
    monkeypatch.setitem(sources.LIBRARIES, "delta", "no_such_module_here")
    with pytest.raises(ConfigError, match=r"output.format: delta needs the no_such_module_here "
                                          r"package.*\[tables\]"):
        sources.require_library("delta", "output.format")
    monkeypatch.setitem(sources.LIBRARIES, "iceberg", "no_such_iceberg_module")
    with pytest.raises(ConfigError, match=r"input.format: iceberg needs the "
                                          r"no_such_iceberg_module package"):
        sources.list_input(InputSpec(format="iceberg", uri="x/metadata/v1.metadata.json"))


def test_every_documented_index_option_is_set_from_a_job_file():
    """output.index is validated once, by IndexSpec; the sink resolves only what depends on
    the output's columns."""
    import pyarrow as pa

    from pipeline.sinks.lance_index import index_plan

    job = {"input": {"uri": "s3://b/in"}, "model": {"uri": "s3://b/m"}, "task": {"kind": "embed"},
           "output": {"uri": "s3://b/out", "format": "lance", "index": {
               "column": "vec", "metric": "dot", "type": "IVF_HNSW_PQ", "num_partitions": 4,
               "num_sub_vectors": 8, "num_bits": 4, "name": "my_idx", "min_rows": 10}}}
    index = load_spec(job).output.index
    schema = pa.schema([("vec", pa.list_(pa.float32(), 32)), ("id", pa.int64())])
    plan = index_plan("s3://b/out", index, schema)
    assert (plan.column, plan.metric, plan.type, plan.name, plan.min_rows) == \
        ("vec", "dot", "IVF_HNSW_PQ", "my_idx", 10)
    assert plan.create_kwargs() == {"num_partitions": 4, "num_sub_vectors": 8, "num_bits": 4}
    for kind in ("IVF_SQ", "IVF_HNSW_FLAT", "IVF_FLAT", "IVF_HNSW_SQ", "IVF_PQ"):
        job["output"]["index"] = {"type": kind}
        assert load_spec(job).output.index.type == kind
    defaults = index_plan("u", load_spec({**job, "output": {**job["output"], "index": {}}})
                          .output.index, schema)
    assert (defaults.column, defaults.num_sub_vectors, defaults.num_bits, defaults.min_rows,
            defaults.name) == ("vec", 2, 8, 256, "vec_idx")
    for bad, message in (({"num_bits": 5}, "output.index.num_bits: Input should be 4 or 8"),
                         ({"nbits": 8}, "output.index.nbits: unknown key"),
                         ({"type": "HNSW"}, "output.index.type: Input should be")):
        job["output"]["index"] = bad
        with pytest.raises(ConfigError, match=message):
            load_spec(job)


def test_task_keys_added_later_leave_earlier_fingerprints_alone():
    """An embed output written before task.dimensions, quantize and chunking existed resumes:
    those keys count only when set (what such a job recorded: the six keys below)."""
    from pipeline.spec import JobSpec

    base = {"name": "j", "input": {"uri": "/in"}, "model": {"uri": "/m"},
            "output": {"uri": "/out"}}
    plain = JobSpec.model_validate({**base, "task": {"kind": "embed"}}).fingerprint_fields()
    assert plain["task"] == {"kind": "embed", "text_column": "text", "image_column": "image",
                             "output_column": "embedding", "max_length": None,
                             "empty_text": "dead_letter"}
    cut = JobSpec.model_validate({**base, "task": {"kind": "embed", "dimensions": 64}})
    assert cut.fingerprint_fields()["task"]["dimensions"] == 64
    zero = JobSpec.model_validate({**base, "task": {"labels": ["a"], "template": "{}"}})
    assert "image_column" not in zero.fingerprint_fields()["task"]

"""Job spec: defaults, profiles merged over a job file, overrides, env interpolation, schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.spec import json_schema, load_spec, redact

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
    assert set(schema["required"]) == {"input", "model", "task", "output"}


def test_table_format_without_its_library_is_a_one_line_error(monkeypatch):
    from pipeline import job
    from pipeline.errors import ConfigError

    job.check_table_library("delta")  # installed with the tables extra: no error
    monkeypatch.setitem(job.TABLE_LIBRARIES, "delta", "no_such_module_here")
    with pytest.raises(ConfigError, match=r"output.format: delta needs the no_such_module_here "
                                          r"package.*\[tables\]"):
        job.check_table_library("delta")

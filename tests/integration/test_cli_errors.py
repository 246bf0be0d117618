"""Malformed jobs: exit 2 with one line naming the file, key and value; nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.run import main
from tests.support.fixtures import write_text_parquet


@pytest.fixture()
def base(tmp_path, minilm_dir, text_rows) -> dict:
    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:20])
    return {
        "input": {"uri": str(tmp_path / "in")},
        "model": {"uri": str(minilm_dir)},
        "task": {"kind": "embed"},
        "output": {"uri": str(tmp_path / "out")},
    }


def write(tmp_path: Path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def change(base: dict, dotted: str, value) -> dict:
    node = base
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(last)
    else:
        node[last] = value
    return base


DELETE = object()

CASES = [
    ("unknown top-level key", lambda b: change(b, "colour", "red"), "colour: unknown key"),
    ("unknown nested key", lambda b: change(b, "task.text_col", "x"), "task.text_col: unknown key"),
    ("wrong type", lambda b: change(b, "workers", {"cpu": {"replicas": "many"}}),
     'workers.cpu.replicas: Input should be a valid integer or Input should be \'auto\' (got "many")'),
    ("missing output", lambda b: change(b, "output", DELETE), "output: required key is missing"),
    ("unknown task kind", lambda b: change(b, "task.kind", "summarize"),
     "task: kind must be one of embed, classify, tensor"),
    ("bad enum", lambda b: change(b, "output.mode", "append"),
     "output.mode: Input should be 'resume', 'incremental', 'overwrite', 'fail_if_exists' or "
     "'merge' (got \"append\")"),
    ("negative number", lambda b: change(b, "sharding", {"rows_per_shard": -5}),
     "sharding.rows_per_shard: Input should be greater than 0 (got -5)"),
    ("env var not set", lambda b: change(b, "output.uri", "${PIPELINE_TEST_UNSET_VAR}/x"),
     "output.uri: environment variable PIPELINE_TEST_UNSET_VAR is not set"),
    ("input missing", lambda b: change(b, "input.uri", "/nonexistent/data"),
     "input.uri: file:///nonexistent/data does not exist"),
    ("model missing", lambda b: change(b, "model.uri", "/nonexistent/model"),
     "model.uri: file:///nonexistent/model: no such file or folder"),
    ("sha pin mismatch", lambda b: change(b, "model.sha256", "0" * 64),
     "model.sha256: pinned 0000000000"),
    ("text column missing", lambda b: change(b, "task.text_column", "body"),
     "column 'body' is missing"),
    ("output over input", lambda b: change(b, "output.uri", b["input"]["uri"]),
     "writing there would overwrite the input"),
    ("output inside input", lambda b: change(b, "output.uri", b["input"]["uri"] + "/scored"),
     "is inside input.uri"),
    ("passthrough clashes", lambda b: change(b, "passthrough", ["embedding"]),
     "passthrough column 'embedding' clashes with a task output"),
    ("task does not fit bundle", lambda b: change(b, "task", {"kind": "classify"}),
     "task.kind: 'classify' but the bundle"),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_malformed_job_exits_2_with_one_line(name, mutate, expected, base, tmp_path, capsys):
    path = write(tmp_path, mutate(base))
    assert main([path, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_invalid_yaml_names_line(tmp_path, capsys):
    path = write(tmp_path, "input:\n  uri: [unclosed\n")
    assert main([path]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not valid YAML at line" in err


def test_job_file_not_found(tmp_path, capsys):
    assert main([str(tmp_path / "nope.yaml")]) == 2
    assert "job file not found" in capsys.readouterr().err


def test_top_level_list_rejected(tmp_path, capsys):
    assert main([write(tmp_path, "- a\n- b\n")]) == 2
    assert "expected a mapping of keys at the top level" in capsys.readouterr().err


def test_bad_override(base, tmp_path, capsys):
    assert main([write(tmp_path, base), "--set", "workers.cpu.replicas"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err


def test_secrets_never_printed(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_SECRET", "hunter2-very-secret")
    base["input"]["storage_options"] = {"secret": "${PIPELINE_TEST_SECRET}", "bogus": {"x": 1}}
    base["input"]["storage_options"]["token"] = "${PIPELINE_TEST_SECRET}"
    base["colour"] = {"password": "${PIPELINE_TEST_SECRET}"}
    assert main([write(tmp_path, base)]) == 2
    assert "hunter2" not in capsys.readouterr().err


def test_dry_run_writes_nothing(base, tmp_path, capsys):
    path = write(tmp_path, base)
    assert main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 files, 1 shards, 20 rows" in out
    assert "providers cpu: asked cpu; here runs on cpu" in out
    assert not (tmp_path / "out").exists()


def test_real_cli_process_exit_code_and_overrides(base, tmp_path):
    path = write(tmp_path, base)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.run", path, "--set", "output.mode=nonsense"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: output.mode: Input should be 'resume', 'incremental', 'overwrite', "
        "'fail_if_exists' or 'merge' (got \"nonsense\")"
    ]

"""python -m pipeline.models validate / info: good bundles pass, broken ones fail in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from pipeline.models.bundle import fetch_bundle
from pipeline.models.onnx_graph import IR_VERSION, OPSET
from pipeline.models.validate import RuntimeLimits, runtime_limits
from pipeline.storage import sha256_file


def _cli(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.models", *args],
        cwd=repo_root, capture_output=True, text=True, timeout=120, check=False,
    )


def _assert_rejected(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert "valid" not in result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _read_yaml(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "bundle.yaml").read_text())


def _write_yaml(bundle: Path, data: dict) -> None:
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _rehash(bundle: Path) -> None:
    """Make bundle.yaml match model.onnx again, so only the intended defect remains."""
    data = _read_yaml(bundle)
    data["sha256"] = sha256_file(str(bundle / "model.onnx"))
    _write_yaml(bundle, data)


@pytest.fixture
def bundle_copy(tmp_path: Path, breast_cancer_dir: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(breast_cancer_dir, dest)
    return dest


# ---- good bundles ------------------------------------------------------------------------


def test_validate_breast_cancer_with_smoke_runs(repo_root, breast_cancer_dir):
    result = _cli(repo_root, "validate", str(breast_cancer_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{breast_cancer_dir}: valid (IR {IR_VERSION}, opset {OPSET})")
    cpu = [line for line in lines[1:] if line.split()[:1] == ["cpu"]]
    assert len(cpu) == 1, result.stdout
    assert "loads" in cpu[0]
    assert "probabilities[2, 2]" in cpu[0]


def test_validate_minilm(repo_root, minilm_dir):
    result = _cli(repo_root, "validate", str(minilm_dir), "--no-smoke")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{minilm_dir}: valid (IR {IR_VERSION}, opset {OPSET})"]


def test_validate_relative_path_from_repo_root(repo_root):
    result = _cli(repo_root, "validate", "models/minilm", "--no-smoke")
    assert result.returncode == 0, result.stderr
    assert "models/minilm: valid" in result.stdout


@pytest.mark.parametrize(
    ("name", "task", "inputs", "outputs"),
    [
        ("breast_cancer", "classify", {"features": "features"},
         {"probabilities": "probabilities", "label": None}),
        ("minilm", "embed",
         {"input_ids": "tokens.ids", "attention_mask": "tokens.attention_mask",
          "token_type_ids": "tokens.type_ids"},
         {"sentence_embedding": "embedding"}),
    ],
)
def test_info_json(repo_root, models_dir, name, task, inputs, outputs):
    bundle = models_dir / name
    result = _cli(repo_root, "info", str(bundle), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["task"] == task
    assert info["sha256"] == _read_yaml(bundle)["sha256"]
    assert info["sha256"] == sha256_file(str(bundle / "model.onnx"))
    assert info["identity"] == fetch_bundle(str(bundle)).identity != info["sha256"]
    assert info["size_bytes"] == (bundle / "model.onnx").stat().st_size
    assert info["ir_version"] == IR_VERSION
    assert info["opsets"]["ai.onnx"] == OPSET
    assert {i["name"]: i["source"] for i in info["inputs"]} == inputs
    assert {o["name"]: o["role"] for o in info["outputs"]} == outputs
    for item in info["inputs"] + info["outputs"]:
        assert item["type"] in ("float", "int64")
        assert isinstance(item["shape"], list) and item["shape"]


def test_info_text_shows_sha256_and_identity(repo_root, breast_cancer_dir):
    result = _cli(repo_root, "info", str(breast_cancer_dir))
    assert result.returncode == 0, result.stderr
    bundle = fetch_bundle(str(breast_cancer_dir))
    assert f"sha256   {bundle.sha256}" in result.stdout.splitlines()
    assert f"identity {bundle.identity}" in result.stdout.splitlines()


def test_info_json_minilm_shapes(repo_root, minilm_dir):
    info = json.loads(_cli(repo_root, "info", str(minilm_dir), "--json").stdout)
    assert info["inputs"][0]["shape"] == ["batch", "sequence"]
    assert info["outputs"][0]["shape"] == ["batch", 384]
    assert info["text"] == {"tokenizer": "tokenizer.json", "max_length": 256}


# ---- rejections --------------------------------------------------------------------------


def test_garbage_model_is_rejected(repo_root, bundle_copy):
    (bundle_copy / "model.onnx").write_bytes(b"\x0a\xff\xff\xff" + b"this is not onnx" * 8)
    _rehash(bundle_copy)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)),
                     "model.onnx", "not a readable ONNX model")


def test_model_failing_the_onnx_checker_is_rejected(repo_root, bundle_copy):
    model = onnx.load(str(bundle_copy / "model.onnx"))
    model.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(model, str(bundle_copy / "model.onnx"))
    _rehash(bundle_copy)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)),
                     "onnx checker failed", "no_such_tensor")


@pytest.mark.parametrize("newer_than", ["onnx", "runtime"])
def test_too_new_ir_version_is_rejected(repo_root, bundle_copy, newer_than):
    # One past what the onnx package writes, and one past what the installed onnxruntime
    # loads; the first is past the runtime too, as onnxruntime never leads onnx.
    base = onnx.IR_VERSION if newer_than == "onnx" else runtime_limits().max_ir_version
    ir_version = base + 1
    assert ir_version > runtime_limits().max_ir_version
    model = onnx.load(str(bundle_copy / "model.onnx"))
    model.ir_version = ir_version
    onnx.save(model, str(bundle_copy / "model.onnx"))
    _rehash(bundle_copy)
    line = _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)),
                            f"IR version {ir_version}")
    assert f"max {runtime_limits().max_ir_version}" in line


def test_too_new_opset_is_rejected(repo_root, bundle_copy):
    opset = runtime_limits().max_opset + 1
    model = onnx.load(str(bundle_copy / "model.onnx"))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    onnx.save(model, str(bundle_copy / "model.onnx"))
    _rehash(bundle_copy)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)), f"opset {opset}")


def test_input_missing_from_graph_is_rejected(repo_root, bundle_copy):
    data = _read_yaml(bundle_copy)
    data["inputs"]["patient_age"] = "column:age"
    _write_yaml(bundle_copy, data)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)),
                     "inputs.patient_age", "graph inputs: features")


def test_output_missing_from_graph_is_rejected(repo_root, bundle_copy):
    data = _read_yaml(bundle_copy)
    data["outputs"]["probabilities"] = "probs"
    _write_yaml(bundle_copy, data)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)), "'probs'")


def test_sha256_mismatch_is_rejected(repo_root, bundle_copy):
    data = _read_yaml(bundle_copy)
    real = data["sha256"]
    data["sha256"] = "0" * 64
    _write_yaml(bundle_copy, data)
    line = _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)), "sha256", real)
    assert "0" * 64 in line
    _assert_rejected(_cli(repo_root, "info", str(bundle_copy), "--json"), "sha256")


def test_unknown_bundle_key_is_rejected(repo_root, bundle_copy):
    data = _read_yaml(bundle_copy)
    data["modle_file"] = "model.onnx"
    _write_yaml(bundle_copy, data)
    _assert_rejected(_cli(repo_root, "validate", str(bundle_copy)), "modle_file")


def test_missing_bundle_is_rejected(repo_root, tmp_path):
    _assert_rejected(_cli(repo_root, "validate", str(tmp_path / "nope")), "not a directory")


# ---- runtime limits ----------------------------------------------------------------------


def test_runtime_limits():
    limits = runtime_limits()
    assert isinstance(limits, RuntimeLimits)
    assert limits.max_ir_version >= 8
    assert limits.max_opset >= 17
    # Bounded by what the probe can express: it starts just above onnx's own numbers.
    assert limits.max_ir_version <= onnx.IR_VERSION + 2
    assert limits.max_opset <= onnx.defs.onnx_opset_version() + 2
    assert runtime_limits() is limits  # probed once per process

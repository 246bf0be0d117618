"""export-demo-tabular is reproducible: two exports, in two processes and two working
directories with different hash seeds, give byte-identical bundles that name no local path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import yaml

from pipeline.models.bundle import fetch_bundle


def _export(repo_root: Path, out: Path, cwd: Path, hash_seed: str) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.models", "export-demo-tabular", "--out", str(out)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_two_tabular_exports_are_byte_identical(repo_root, tmp_path):
    outs = [tmp_path / "a" / "bundle", tmp_path / "b" / "elsewhere"]
    _export(repo_root, outs[0], tmp_path / "a", "1")
    _export(repo_root, outs[1], tmp_path / "b", "2")
    names = ("bundle.yaml", "model.onnx")
    first, second = ({n: (o / n).read_bytes() for n in names} for o in outs)
    assert first == second
    assert fetch_bundle(str(outs[0])).identity == fetch_bundle(str(outs[1])).identity
    for data in first.values():
        assert str(tmp_path).encode() not in data
        assert str(repo_root).encode() not in data

    source = yaml.safe_load(first["bundle.yaml"])["source"]
    assert set(source["versions"]) == {"scikit-learn", "skl2onnx", "onnx"}
    model = onnx.load(str(outs[0] / "model.onnx"))
    assert model.producer_name == "skl2onnx"
    assert model.producer_version == source["versions"]["skl2onnx"]

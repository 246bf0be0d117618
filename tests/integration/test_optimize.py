"""optimize on the real MiniLM bundle: int8 and fused pass the gate and record it, the int8
bundle scores close to fp32 through pipeline.score, an unmet gate exits 2 writing nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

import pipeline
from pipeline.demo.text import make_text_table
from pipeline.models.__main__ import main
from pipeline.models.bundle import fetch_bundle


def _record(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "bundle.yaml").read_text())["source"]["optimization"]


@pytest.fixture(scope="module")
def int8_bundle(minilm_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("optimized") / "int8"
    assert main(["optimize", str(minilm_dir), "--level", "int8", "--out", str(out),
                 "--rows", "100"]) == 0
    return out


def test_int8_passes_the_gate_and_records_it(int8_bundle, minilm_dir):
    record = _record(int8_bundle)
    source = fetch_bundle(str(minilm_dir))
    assert record["level"] == "int8" and record["onnxruntime"] == ort.__version__
    assert record["from"] == {"sha256": source.sha256, "identity": source.identity}
    gate = record["gate"]
    assert (gate["metric"], gate["threshold"], gate["rows"]) == ("min_cosine", 0.99, 100)
    assert 0.99 <= gate["value"] < 1.0
    assert record["recipe"]["smoothquant"]["alpha"] == 0.75 and record["recipe"]["float_nodes"]
    new = fetch_bundle(str(int8_bundle))
    assert new.identity != source.identity and new.sha256 != source.sha256
    assert (int8_bundle / "tokenizer.json").read_bytes() == \
        (minilm_dir / "tokenizer.json").read_bytes()
    assert new.model_path.stat().st_size < 0.7 * source.model_path.stat().st_size
    assert main(["validate", str(int8_bundle), "--no-smoke"]) == 0


def test_int8_scores_close_to_fp32(int8_bundle, minilm_dir):
    table = make_text_table(100, seed=5).select(["id", "text"])  # neither gate nor calibration
    fp32 = np.array(pipeline.score(table, model=str(minilm_dir))["embedding"].to_pylist())
    int8 = np.array(pipeline.score(table, model=str(int8_bundle))["embedding"].to_pylist())
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.99, cosine.min()


def test_unmet_gate_exits_2_in_one_line_and_writes_nothing(minilm_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    code = main(["optimize", str(minilm_dir), "--level", "int8", "--out", str(out),
                 "--rows", "32", "--min-cosine", "0.99999"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert str(minilm_dir) in err and "int8" in err and "min cosine 0.9" in err
    assert "< 0.99999" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []  # no bundle, no temp directory left behind


def test_fused_passes_with_every_fusion(minilm_dir, tmp_path, capsys):
    assert main(["optimize", str(minilm_dir), "--level", "fused", "--out",
                 str(tmp_path / "fused"), "--rows", "32"]) == 0
    record = _record(tmp_path / "fused")
    assert record["fusions"] == {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6,
                                 "SkipLayerNormalization": 12}
    assert record["gate"]["value"] > 0.9999
    assert "fused: EmbedLayerNormalization 1, Attention 6" in capsys.readouterr().out


def _cuda_works() -> bool:
    from pipeline.models.optimize import provider_problem

    return provider_problem("cuda") is None


def test_fp16_gate_runs_where_asked_or_says_why_not(minilm_dir, tmp_path, capsys):
    out = tmp_path / "fp16"
    code = main(["optimize", str(minilm_dir), "--level", "fp16", "--out", str(out),
                 "--rows", "32", "--provider", "cuda"])
    err = capsys.readouterr().err
    if _cuda_works():
        assert code == 0 and _record(out)["gate"]["provider"] == "cuda", err
    else:
        assert code == 2 and err.count("\n") == 1 and "cannot run on cuda" in err, err
        assert not out.exists()


def test_fp16_gate_on_cpu_says_what_it_checked(minilm_dir, tmp_path, capsys):
    assert main(["optimize", str(minilm_dir), "--level", "fp16", "--out",
                 str(tmp_path / "fp16"), "--rows", "32"]) == 0
    gate = _record(tmp_path / "fp16")["gate"]
    assert gate["provider"] == "cpu" and "not float16 arithmetic" in gate["note"]
    assert "note: the CPU provider runs float16 nodes in float32" in capsys.readouterr().out

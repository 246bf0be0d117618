"""optimize on tiny models: export-bert graphs fuse fully, the classifier gate measures the
largest probability error, and a failed or impossible gate exits 2 writing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.numpy import save_file

from pipeline.accuracy_gate import GateSettings, optimize_bundle
from pipeline.models.__main__ import main
from pipeline.models.bert_export import export_bert
from pipeline.models.bundle import BundleSpec, write_bundle_spec
from pipeline.models.graph_rewrites import canonical_bert
from pipeline.models.onnx_graph import GraphBuilder, float_output
from pipeline.models.optimize import fuse_bert
from pipeline.storage import sha256_file

FEATURES, HIDDEN_UNITS, CLASSES = 8, 16, 3


def _tiny_bert_checkpoint(root: Path, tokenizer: Path, act: str) -> Path:
    """A 2-layer random BERT with the MiniLM vocabulary, so real text tokenizes into range."""
    hidden, inter, vocab, pos = 32, 64, 30522, 64
    rng = np.random.default_rng(0)

    def mat(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": mat(vocab, hidden, scale=1.0),
         "embeddings.position_embeddings.weight": mat(pos, hidden),
         "embeddings.token_type_embeddings.weight": mat(2, hidden),
         "embeddings.LayerNorm.weight": 1 + mat(hidden), "embeddings.LayerNorm.bias": mat(hidden)}
    for i in range(2):
        p = f"encoder.layer.{i}"
        for name, n_out, n_in in [("attention.self.query", hidden, hidden),
                                  ("attention.self.key", hidden, hidden),
                                  ("attention.self.value", hidden, hidden),
                                  ("attention.output.dense", hidden, hidden),
                                  ("intermediate.dense", inter, hidden),
                                  ("output.dense", hidden, inter)]:
            w[f"{p}.{name}.weight"], w[f"{p}.{name}.bias"] = mat(n_out, n_in), mat(n_out)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}.{norm}.weight"], w[f"{p}.{norm}.bias"] = 1 + mat(hidden), mat(hidden)
    root.mkdir()
    config = {"model_type": "bert", "vocab_size": vocab, "hidden_size": hidden,
              "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": inter,
              "max_position_embeddings": pos, "hidden_act": act}
    (root / "config.json").write_text(json.dumps(config))
    save_file(w, str(root / "model.safetensors"))
    shutil.copyfile(tokenizer, root / "tokenizer.json")
    return root


@pytest.fixture(scope="module", params=["gelu", "gelu_new"])
def tiny_bert(request, tmp_path_factory, minilm_dir: Path) -> Path:
    root = tmp_path_factory.mktemp(f"tiny-{request.param}")
    ckpt = _tiny_bert_checkpoint(root / "ckpt", minilm_dir / "tokenizer.json", request.param)
    export_bert(str(ckpt), root / "bundle", max_length=64)
    return root / "bundle"


def test_export_bert_graph_fuses_fully(tiny_bert):
    from pipeline.models.bundle import fetch_bundle

    fused = fuse_bert(fetch_bundle(str(tiny_bert)))
    assert fused.recipe["canonicalized"][:3] == ["mask", "positions", "attention scale"]
    assert fused.fusions["Attention"] == 2
    assert fused.fusions["SkipLayerNormalization"] == 4
    assert fused.fusions["EmbedLayerNormalization"] == 1
    assert fused.fusions.get("BiasGelu", 0) + fused.fusions.get("FastGelu", 0) == 2


def test_canonical_rewrites_keep_outputs(tiny_bert):
    import onnxruntime as ort

    model = onnx.load(str(tiny_bert / "model.onnx"))
    ids = np.array([[101, 2023, 2003, 102, 0, 0], [101, 7592, 2088, 999, 2000, 102]], np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0]

    before = run(model)
    canonical_bert(model)
    np.testing.assert_allclose(run(model), before, atol=1e-6)


def test_fused_tiny_bert_passes_the_gate(tiny_bert, tmp_path):
    done = optimize_bundle(str(tiny_bert), tmp_path / "fused", "fused", GateSettings(rows=32))
    assert done.gate.metric == "min_cosine" and done.gate.value > 0.9999
    record = yaml.safe_load((tmp_path / "fused" / "bundle.yaml").read_text())["source"]
    assert record["optimization"]["gate"]["rows"] == 32
    assert (tmp_path / "fused" / "tokenizer.json").read_bytes() == \
        (tiny_bert / "tokenizer.json").read_bytes()


def test_text_sample_file_is_the_gate_sample(tiny_bert, tmp_path):
    sample = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": [f"sentence number {i} about files" for i in range(20)]}),
                   sample)
    done = optimize_bundle(str(tiny_bert), tmp_path / "fused", "fused",
                           GateSettings(sample=sample))
    assert (done.gate.rows, done.gate.sample) == (20, "texts.parquet")


def test_int8_calibrates_on_half_the_sample_and_gates_on_the_other(tiny_bert, tmp_path):
    """A user's own texts fit SmoothQuant; the gate judges int8 only on rows it was not fitted
    to, so a passing figure is not flattered by the calibration."""
    sample = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": [f"line {i} of a log about disks" for i in range(21)]}),
                   sample)
    done = optimize_bundle(str(tiny_bert), tmp_path / "int8", "int8",
                           GateSettings(sample=sample, min_cosine=0.5))
    record = done.spec.source["optimization"]
    assert record["recipe"]["smoothquant"]["calibration"] == "11 even rows of texts.parquet"
    assert (done.gate.rows, done.gate.sample) == (10, "10 odd rows of texts.parquet")
    assert record["gate"]["rows"] == 10


# ---- a tiny MLP classifier: the max-probability-error gate -----------------------------------

@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(0)
    g = GraphBuilder()
    hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", [
        "features", g.const(rng.normal(0, 0.3, (FEATURES, HIDDEN_UNITS)).astype(np.float32))]),
        g.const(np.zeros(HIDDEN_UNITS, np.float32))])])
    logits = g.op("Add", [g.op("MatMul", [hidden, g.const(
        rng.normal(0, 0.3, (HIDDEN_UNITS, CLASSES)).astype(np.float32))]),
        g.const(np.zeros(CLASSES, np.float32))])
    g.op("Softmax", [logits], name="probabilities", axis=-1)
    features = onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT,
                                                  ["batch", FEATURES])
    model = g.model([features], [float_output("probabilities", ["batch", CLASSES])], "mlp")
    onnx.save_model(model, str(out / "model.onnx"))
    write_bundle_spec(out, BundleSpec(
        task="classify", sha256=sha256_file(str(out / "model.onnx")),
        inputs={"features": "features"}, outputs={"probabilities": "probabilities"},
        features=[f"f{i}" for i in range(FEATURES)], labels=["a", "b", "c"]))
    return out


@pytest.fixture(scope="module")
def mlp_sample(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "rows.parquet"
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({f"f{i}": rng.normal(size=200) for i in range(FEATURES)}), path)
    return path


def test_int8_classifier_gate_records_max_prob_error(mlp_bundle, mlp_sample, tmp_path, capsys):
    out = tmp_path / "int8"
    code = main(["optimize", str(mlp_bundle), "--level", "int8", "--out", str(out),
                 "--sample", str(mlp_sample)])
    assert code == 0, capsys.readouterr().err
    gate = yaml.safe_load((out / "bundle.yaml").read_text())["source"]["optimization"]["gate"]
    assert gate["metric"] == "max_prob_error" and gate["rows"] == 200
    assert 0 < gate["value"] <= 0.01 and gate["threshold"] == 0.01
    assert main(["validate", str(out), "--no-smoke"]) == 0


def test_unmet_classifier_gate_exits_2_in_one_line(mlp_bundle, mlp_sample, tmp_path, capsys):
    out = tmp_path / "int8"
    code = main(["optimize", str(mlp_bundle), "--level", "int8", "--out", str(out),
                 "--sample", str(mlp_sample), "--max-prob-error", "1e-9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "int8" in err and "max prob error" in err and "1e-09" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("bundle", "args", "expected"), [
    ("breast_cancer", ["--level", "int8"], "pass --sample FILE.parquet"),
    ("breast_cancer", ["--level", "fused"], "--level fused is for transformer text bundles"),
    ("mlp", ["--level", "int8", "--sample", "missing.parquet"], "not a readable Parquet file"),
])
def test_refusals_are_one_line(bundle, args, expected, breast_cancer_dir, mlp_bundle, tmp_path,
                               capsys):
    path = breast_cancer_dir if bundle == "breast_cancer" else mlp_bundle
    code = main(["optimize", str(path), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_no_quantizable_ops_is_refused(breast_cancer_dir, tmp_path, capsys):
    sample = tmp_path / "rows.parquet"
    features = yaml.safe_load((breast_cancer_dir / "bundle.yaml").read_text())["features"]
    pq.write_table(pa.table({f: np.ones(4) for f in features}), sample)
    code = main(["optimize", str(breast_cancer_dir), "--level", "int8", "--out",
                 str(tmp_path / "out"), "--sample", str(sample)])
    err = capsys.readouterr().err
    assert code == 2 and "found no MatMul or Attention" in err and err.count("\n") == 1


def test_existing_out_is_refused(mlp_bundle, mlp_sample, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code = main(["optimize", str(mlp_bundle), "--level", "int8", "--out", str(tmp_path / "out"),
                 "--sample", str(mlp_sample)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

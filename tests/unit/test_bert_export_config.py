"""export-bert: unsupported configs are rejected; a tiny random BERT matches a numpy forward;
the same checkpoint exported from two places gives byte-identical bundles."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from safetensors.numpy import save_file

from pipeline.errors import ModelError
from pipeline.models.bert_export import BertConfig, export_bert, resolve_source
from pipeline.models.bundle import fetch_bundle
from pipeline.storage import sha256_file

HIDDEN, HEADS, LAYERS, INTERMEDIATE, VOCAB, TYPES, MAX_POS = 32, 2, 2, 64, 100, 2, 64
EPS = 1e-12

BASE_CONFIG = {
    "model_type": "bert",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": MAX_POS,
    "type_vocab_size": TYPES,
    "layer_norm_eps": EPS,
    "hidden_act": "gelu_new",
    "position_embedding_type": "absolute",
}


def test_base_config_is_accepted():
    cfg = BertConfig.from_dict(BASE_CONFIG, "tiny")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.hidden_act) == (32, 2, "gelu_new")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model_type": "gpt2"}, ["model_type", "'gpt2'"]),
        (
            {"position_embedding_type": "relative_key"},
            ["position_embedding_type", "'relative_key'"],
        ),
        ({"hidden_act": "swish"}, ["hidden_act", "'swish'"]),
        (
            {"hidden_size": 30, "num_attention_heads": 4},
            ["hidden_size 30", "num_attention_heads 4"],
        ),
        ({"vocab_size": None}, ["vocab_size"]),
    ],
)
def test_unsupported_config_is_rejected(change, expected):
    cfg = {k: v for k, v in {**BASE_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ModelError) as err:
        BertConfig.from_dict(cfg, "ckpt/config.json")
    message = str(err.value)
    assert message.startswith("ckpt/config.json: ")
    for part in expected:
        assert part in message


# ---- tiny random checkpoint --------------------------------------------------------------


def _random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": (1.0 + mat(HIDDEN, scale=0.1)),
                f"{prefix}.bias": mat(HIDDEN, scale=0.1)}

    def dense(prefix: str, n_out: int, n_in: int) -> dict[str, np.ndarray]:
        return {f"{prefix}.weight": mat(n_out, n_in), f"{prefix}.bias": mat(n_out, scale=0.1)}

    w = {
        "embeddings.word_embeddings.weight": mat(VOCAB, HIDDEN, scale=1.0),
        "embeddings.position_embeddings.weight": mat(MAX_POS, HIDDEN, scale=0.5),
        "embeddings.token_type_embeddings.weight": mat(TYPES, HIDDEN, scale=0.5),
        **norm("embeddings.LayerNorm"),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            w.update(dense(f"{p}.attention.self.{name}", HIDDEN, HIDDEN))
        w.update(dense(f"{p}.attention.output.dense", HIDDEN, HIDDEN))
        w.update(norm(f"{p}.attention.output.LayerNorm"))
        w.update(dense(f"{p}.intermediate.dense", INTERMEDIATE, HIDDEN))
        w.update(dense(f"{p}.output.dense", HIDDEN, INTERMEDIATE))
        w.update(norm(f"{p}.output.LayerNorm"))
    return w


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _linear(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return x @ w[f"{prefix}.weight"].astype(np.float64).T + w[f"{prefix}.bias"]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _numpy_bert(w: dict[str, np.ndarray], ids: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Token vectors [S, H] of one unpadded sequence: a plain post-LN BERT forward in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    seq = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:seq]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = _layer_norm(x, w, "embeddings.LayerNorm")
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        q, k, v = [  # each [heads, S, head_dim]
            _linear(x, w, f"{p}.attention.self.{n}").reshape(seq, HEADS, head_dim)
            .transpose(1, 0, 2)
            for n in ("query", "key", "value")
        ]
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(seq, HIDDEN)
        attn = _layer_norm(_linear(ctx, w, f"{p}.attention.output.dense") + x, w,
                           f"{p}.attention.output.LayerNorm")
        ff = _linear(_gelu_tanh(_linear(attn, w, f"{p}.intermediate.dense")), w,
                     f"{p}.output.dense")
        x = _layer_norm(ff + attn, w, f"{p}.output.LayerNorm")
    return x


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, minilm_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    ckpt = tmp_path_factory.mktemp("tiny-bert")
    (ckpt / "config.json").write_text(json.dumps(BASE_CONFIG))
    weights = _random_weights()
    save_file(weights, str(ckpt / "model.safetensors"))
    shutil.copyfile(minilm_dir / "tokenizer.json", ckpt / "tokenizer.json")
    return ckpt, weights


# Two sequences of different lengths; the shorter is right-padded in the batch.
LENGTHS = (11, 6)
WIDTH = 11


def _inputs(seed: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, size=n) for n in LENGTHS]
    types = [(np.arange(n) >= n // 2).astype(np.int64) for n in LENGTHS]  # two segments
    return ids, types


def _padded_feed(ids: list[np.ndarray], types: list[np.ndarray]) -> dict[str, np.ndarray]:
    feed = {k: np.zeros((len(ids), WIDTH), dtype=np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    for row, (i, t) in enumerate(zip(ids, types, strict=True)):
        feed["input_ids"][row, :len(i)] = i
        feed["attention_mask"][row, :len(i)] = 1
        feed["token_type_ids"][row, :len(i)] = t
    return feed


def _run(model: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_tiny_bert_token_vectors_match_numpy(tiny_checkpoint, tmp_path):
    ckpt, weights = tiny_checkpoint
    spec = export_bert(str(ckpt), tmp_path / "tokens", pool_in_graph=False)
    assert spec.outputs == {"embedding": "last_hidden_state"}
    assert spec.text.max_length == MAX_POS
    assert spec.embedding.dim == HIDDEN
    # No modules.json: sentence-transformers' defaults (mean pooling, no normalization).
    assert (spec.embedding.pooling, spec.embedding.normalize) == ("mean", False)
    assert (tmp_path / "tokens" / "tokenizer.json").exists()

    ids, types = _inputs()
    out = _run(tmp_path / "tokens" / "model.onnx", _padded_feed(ids, types))
    assert out.shape == (2, WIDTH, HIDDEN)
    for row, n in enumerate(LENGTHS):
        expected = _numpy_bert(weights, ids[row], types[row])
        np.testing.assert_allclose(out[row, :n], expected, atol=1e-4, rtol=0)


def test_tiny_bert_pooled_in_graph_matches_numpy_and_ignores_padding(tiny_checkpoint, tmp_path):
    ckpt, weights = tiny_checkpoint
    spec = export_bert(str(ckpt), tmp_path / "pooled", normalize=True)
    assert spec.outputs == {"embedding": "sentence_embedding"}
    assert spec.embedding.pooling == "in_graph"
    model = tmp_path / "pooled" / "model.onnx"

    ids, types = _inputs()
    batch = _run(model, _padded_feed(ids, types))
    assert batch.shape == (2, HIDDEN)
    for row in range(len(LENGTHS)):
        pooled = _numpy_bert(weights, ids[row], types[row]).mean(axis=0)
        expected = pooled / np.linalg.norm(pooled)
        np.testing.assert_allclose(batch[row], expected, atol=1e-4, rtol=0)

    # The padded short row equals the same row run alone without padding.
    n = LENGTHS[1]
    alone = _run(model, {"input_ids": ids[1][None, :], "attention_mask": np.ones((1, n), np.int64),
                         "token_type_ids": types[1][None, :]})
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5, rtol=0)
    # ... and the mask matters: attending to the padding would change the vector.
    unmasked = _padded_feed(ids, types)
    unmasked["attention_mask"][:] = 1
    assert np.abs(_run(model, unmasked)[1] - batch[1]).max() > 1e-3


def test_tiny_bert_max_length_beyond_positions_is_rejected(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    with pytest.raises(ModelError, match="max_position_embeddings 64"):
        export_bert(str(ckpt), tmp_path / "too-long", max_length=MAX_POS + 1)


# ---- reproducible exports ------------------------------------------------------------------


def _bundle_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _assert_no_path(data: bytes, *paths: Path) -> None:
    for path in paths:
        assert str(path).encode() not in data, path
        assert path.name.encode() not in data, path.name


def test_export_from_two_checkpoint_copies_is_byte_identical(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    copies = [tmp_path / "checkout-a" / "ckpt", tmp_path / "checkout-b" / "elsewhere"]
    outs = [tmp_path / "out-a", tmp_path / "out-b"]
    for copy, out in zip(copies, outs, strict=True):
        shutil.copytree(ckpt, copy)
        export_bert(str(copy), out)
    first, second = (_bundle_bytes(o) for o in outs)
    assert set(first) == {"bundle.yaml", "model.onnx", "tokenizer.json"}
    assert first == second
    assert fetch_bundle(str(outs[0])).identity == fetch_bundle(str(outs[1])).identity
    for name in ("bundle.yaml", "model.onnx"):
        _assert_no_path(first[name], *copies, ckpt, tmp_path)

    # Provenance by content: the hash of every checkpoint file the export read.
    source = yaml.safe_load(first["bundle.yaml"])["source"]
    assert source["exporter"] == "export-bert"
    assert source["files"] == {name: sha256_file(str(ckpt / name))
                               for name in ("config.json", "model.safetensors", "tokenizer.json")}
    model = onnx.load(str(outs[0] / "model.onnx"))
    assert source["files"]["model.safetensors"] in model.doc_string
    assert not model.metadata_props


def test_export_from_a_package_records_name_not_location(tiny_checkpoint, tmp_path, monkeypatch):
    ckpt, _ = tiny_checkpoint
    package = "tiny_bert_weights_pkg"
    sites = [tmp_path / "site-a", tmp_path / "venv-b" / "site-packages"]
    for site in sites:
        (site / package).mkdir(parents=True)
        (site / package / "__init__.py").write_text("")
        shutil.copytree(ckpt, site / package / "model")
    outs = []
    for i, site in enumerate(sites):
        monkeypatch.syspath_prepend(str(site))
        sys.modules.pop(package, None)
        importlib.invalidate_caches()
        assert resolve_source(package) == site / package / "model"
        outs.append(tmp_path / f"out-{i}")
        export_bert(package, outs[-1])
    first, second = (_bundle_bytes(o) for o in outs)
    assert first == second
    source = yaml.safe_load(first["bundle.yaml"])["source"]
    assert source["package"] == package
    assert source["version"] is None  # not installed as a distribution: no version to record
    assert source["path"] == "model"
    for name in ("bundle.yaml", "model.onnx"):
        _assert_no_path(first[name], *sites)

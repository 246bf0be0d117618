"""A bundle's identity covers model, bundle.yaml values and tokenizer, not formatting or source.

Local bundles are copies of the built ones (MiniLM's 86 MB model is linked, not copied);
the remote case uses a tiny text bundle (embedding-table graph + word-level tokenizer) on the
moto S3 endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.models.bundle import (
    BundleSpec,
    EmbeddingSpec,
    TextSpec,
    fetch_bundle,
    write_bundle_spec,
)
from pipeline.models.onnx_graph import GraphBuilder, float_output, int64_input
from pipeline.models.validate import validate_bundle
from pipeline.storage import sha256_file


def _read_yaml(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "bundle.yaml").read_text())


def _write_yaml(bundle: Path, data: dict, **dump_options) -> None:
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(data, **dump_options))


def _identity(bundle: Path) -> str:
    return fetch_bundle(str(bundle)).identity


@pytest.fixture
def bc_copy(tmp_path: Path, breast_cancer_dir: Path) -> Path:
    dest = tmp_path / "breast_cancer"
    shutil.copytree(breast_cancer_dir, dest)
    return dest


@pytest.fixture
def minilm_copy(tmp_path: Path, minilm_dir: Path) -> Path:
    """bundle.yaml and tokenizer.json copied; model.onnx linked to the built one."""
    dest = tmp_path / "minilm"
    dest.mkdir()
    for name in ("bundle.yaml", "tokenizer.json"):
        shutil.copyfile(minilm_dir / name, dest / name)
    try:
        os.link(minilm_dir / "model.onnx", dest / "model.onnx")
    except OSError:  # another filesystem
        (dest / "model.onnx").symlink_to(minilm_dir / "model.onnx")
    return dest


# ---- what does not change it ---------------------------------------------------------------


def test_identity_is_stable_and_not_the_model_hash(breast_cancer_dir, bc_copy):
    original = _identity(breast_cancer_dir)
    assert len(original) == 64 and original != fetch_bundle(str(breast_cancer_dir)).sha256
    assert _identity(bc_copy) == original  # where the bundle lies is not part of it


def test_reformatting_bundle_yaml_keeps_identity(bc_copy):
    before = _identity(bc_copy)
    data = _read_yaml(bc_copy)
    reordered = dict(reversed(list(data.items())))
    _write_yaml(bc_copy, reordered, sort_keys=False, indent=4, default_flow_style=True)
    text = (bc_copy / "bundle.yaml").read_text()
    (bc_copy / "bundle.yaml").write_text("# a comment\n\n" + text + "\n# trailing comment\n")
    assert _identity(bc_copy) == before


def test_defaults_written_out_keep_identity(bc_copy):
    before = _identity(bc_copy)
    data = _read_yaml(bc_copy)
    del data["model_file"], data["format_version"]  # both are the defaults
    _write_yaml(bc_copy, data)
    assert _identity(bc_copy) == before


def test_editing_source_keeps_identity(minilm_copy):
    before = _identity(minilm_copy)
    data = _read_yaml(minilm_copy)
    data["source"] = {"exporter": "somebody else", "checkpoint": "/elsewhere/model"}
    _write_yaml(minilm_copy, data)
    assert _identity(minilm_copy) == before


def test_files_the_task_does_not_read_keep_identity(bc_copy):
    before = _identity(bc_copy)
    (bc_copy / "README.md").write_text("notes")
    assert _identity(bc_copy) == before


# ---- what changes it -----------------------------------------------------------------------


def test_max_length_change_changes_identity(minilm_copy):
    before = _identity(minilm_copy)
    data = _read_yaml(minilm_copy)
    data["text"]["max_length"] = 16
    _write_yaml(minilm_copy, data)
    after = fetch_bundle(str(minilm_copy))
    assert after.spec.text.max_length == 16
    assert after.sha256 == _read_yaml(minilm_copy)["sha256"]  # the model is the same ...
    assert after.identity != before  # ... the bundle is not


@pytest.mark.parametrize("edit", [
    lambda d: d.update(labels=list(reversed(d["labels"]))),
    lambda d: d.update(labels=["bad", "good"]),
    lambda d: d.update(features=[*d["features"][1:], d["features"][0]]),
    lambda d: d.update(outputs={"logits": "probabilities"}),
])
def test_value_changes_change_identity(bc_copy, edit):
    before = _identity(bc_copy)
    data = _read_yaml(bc_copy)
    edit(data)
    _write_yaml(bc_copy, data)
    assert _identity(bc_copy) != before


def test_tokenizer_change_changes_identity(minilm_copy):
    before = _identity(minilm_copy)
    tokenizer = json.loads((minilm_copy / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = not tokenizer["normalizer"]["lowercase"]
    (minilm_copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    changed = _identity(minilm_copy)
    assert changed != before
    (minilm_copy / "tokenizer.json").unlink()
    assert _identity(minilm_copy) not in (before, changed)  # a missing file counts as well


def test_model_change_changes_identity(bc_copy):
    before = _identity(bc_copy)
    with open(bc_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")  # fetch_bundle checks the hash, not the graph
    data = _read_yaml(bc_copy)
    data["sha256"] = sha256_file(str(bc_copy / "model.onnx"))
    _write_yaml(bc_copy, data)
    assert _identity(bc_copy) != before


# ---- remote: a tiny text bundle on S3 ------------------------------------------------------

WORDS = [f"w{i}" for i in range(100)]  # the smoke run feeds ids below 100
SPECIALS = ["[PAD]", "[UNK]"]
DIM = 4


def _write_tokenizer(path: Path, order: list[str]) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS + order)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def tiny_text_bundle(out: Path) -> Path:
    """An embed bundle: mean of rows of a random embedding table, with its tokenizer."""
    g = GraphBuilder()
    rng = np.random.default_rng(0)
    table = g.const(rng.standard_normal((len(SPECIALS) + len(WORDS), DIM)).astype(np.float32))
    vectors = g.op("Gather", [table, "input_ids"])
    mask = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT),
                              g.const([2], dtype=np.int64)])
    axis = g.const([1], dtype=np.int64)
    summed = g.op("ReduceSum", [g.op("Mul", [vectors, mask]), axis], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask, axis], keepdims=0),
                         g.const(1.0, dtype=np.float32)])
    g.op("Div", [summed, count], name="embedding")
    model = g.model([int64_input(n, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
                    [float_output("embedding", ["batch", DIM])], "tiny_text")
    onnx.checker.check_model(model)
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(model.SerializeToString())
    _write_tokenizer(out / "tokenizer.json", WORDS)
    write_bundle_spec(out, BundleSpec(
        task="embed", sha256=sha256_file(str(out / "model.onnx")),
        inputs={"input_ids": "tokens.ids", "attention_mask": "tokens.attention_mask"},
        outputs={"embedding": "embedding"}, text=TextSpec(max_length=8),
        embedding=EmbeddingSpec(pooling="in_graph", normalize=False, dim=DIM),
    ))
    return out


def test_remote_tokenizer_change_is_fetched_again(s3_options, s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    local = tiny_text_bundle(tmp_path / "tiny")
    fs.put(str(local) + "/", f"{s3_bucket}/tiny/", recursive=True)
    uri = f"s3://{s3_bucket}/tiny"
    cache = tmp_path / "cache"

    first = fetch_bundle(uri, s3_options, cache_dir=cache)
    assert first.identity == fetch_bundle(str(local)).identity
    assert first.path == cache / "bundles" / first.identity
    validate_bundle(first, providers=["cpu"])  # a valid text bundle: it loads and runs
    old_ids = Tokenizer.from_file(str(first.tokenizer_path)).encode("w3").ids

    # Only tokenizer.json changes: same model, same bundle.yaml.
    _write_tokenizer(tmp_path / "new-tokenizer.json", list(reversed(WORDS)))
    fs.put(str(tmp_path / "new-tokenizer.json"), f"{s3_bucket}/tiny/tokenizer.json")

    second = fetch_bundle(uri, s3_options, cache_dir=cache)
    assert second.sha256 == first.sha256
    assert second.identity != first.identity
    assert second.path == cache / "bundles" / second.identity != first.path
    assert second.tokenizer_path.read_bytes() == (tmp_path / "new-tokenizer.json").read_bytes()
    assert Tokenizer.from_file(str(second.tokenizer_path)).encode("w3").ids != old_ids
    assert (second.path / ".complete").read_text() == second.identity
    # The old entry is untouched; fetching again now reuses the new one.
    assert first.tokenizer_path.read_bytes() == (local / "tokenizer.json").read_bytes()
    assert fetch_bundle(uri, s3_options, cache_dir=cache).path == second.path

"""CPU session tuning: the optimized graph cached per node, spinning, batch sizes by device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BATCH_DEFAULTS, BatchingSpec, EmbedTaskSpec
from pipeline.tasks import build_task

FEEDS = {"input_ids": np.array([[101, 7592, 2088, 102]], dtype=np.int64),
         "attention_mask": np.ones((1, 4), dtype=np.int64),
         "token_type_ids": np.zeros((1, 4), dtype=np.int64)}


def _settings(cache: Path, **kw) -> SessionSettings:
    return SessionSettings(intra_op_threads=1, optimized_cache_dir=str(cache),
                           config=(("session.intra_op.allow_spinning", "1"),), **kw)


def test_optimized_graph_is_saved_once_and_reused(minilm_dir: Path, tmp_path: Path):
    bundle = fetch_bundle(str(minilm_dir))
    first = create_session(str(bundle.model_path), _settings(tmp_path), bundle.sha256)
    saved = list((tmp_path / "optimized").glob("*.onnx"))
    assert first.tuning["graph"] == "optimized and saved to the node cache"
    assert len(saved) == 1 and bundle.sha256[:32] in saved[0].name
    assert not list((tmp_path / "optimized").glob(".*.tmp"))  # written whole, then renamed
    second = create_session(str(bundle.model_path), _settings(tmp_path), bundle.sha256)
    assert second.tuning["graph"] == "loaded from the node cache"
    assert second.tuning["intra_op.allow_spinning"] == "1"
    assert second.tuning["intra_op_threads"] == 1
    a = first.session.run(None, FEEDS)[0]
    b = second.session.run(None, FEEDS)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_damaged_cached_graph_is_replaced(minilm_dir: Path, tmp_path: Path):
    bundle = fetch_bundle(str(minilm_dir))
    create_session(str(bundle.model_path), _settings(tmp_path), bundle.sha256)
    [saved] = (tmp_path / "optimized").glob("*.onnx")
    saved.write_bytes(b"not a model")
    again = create_session(str(bundle.model_path), _settings(tmp_path), bundle.sha256)
    assert again.tuning["graph"] == "optimized and saved to the node cache"
    assert saved.stat().st_size > 1_000_000
    assert again.session.run(None, FEEDS)[0].shape == (1, 384)


def test_no_cache_without_a_hash_or_for_gpu_chains(minilm_dir: Path, tmp_path: Path):
    bundle = fetch_bundle(str(minilm_dir))
    plain = create_session(str(bundle.model_path), _settings(tmp_path))  # no sha256 given
    gpu = create_session(str(bundle.model_path), _settings(tmp_path, providers=("cuda", "cpu")),
                         bundle.sha256)
    assert plain.tuning["graph"] == gpu.tuning["graph"] == "optimized in memory"
    assert not (tmp_path / "optimized").exists()


@pytest.mark.parametrize("device", ["cpu", "cuda", "tensorrt"])
def test_batch_sizes_left_out_follow_the_device(minilm_dir: Path, breast_cancer_dir: Path,
                                                device: str):
    defaults = BATCH_DEFAULTS["cpu" if device == "cpu" else "gpu"]
    text = build_task(fetch_bundle(str(minilm_dir)), EmbedTaskSpec(kind="embed"),
                      BatchingSpec(), {}, device)
    assert (text.batching.max_tokens, text.batching.max_rows) == \
        (defaults["max_tokens"], defaults["max_rows"])
    tabular = BatchingSpec().for_device(device, "tabular")
    assert tabular.max_rows == defaults["max_rows_tabular"]
    assert tabular.window_rows == 4096
    image = BatchingSpec().for_device(device, "image")
    assert (image.max_rows, image.window_rows) == \
        (defaults["max_rows_image"], defaults["window_rows_image"])
    assert BATCH_DEFAULTS["cpu"]["max_rows"] < BATCH_DEFAULTS["gpu"]["max_rows"]


def test_batch_sizes_the_job_sets_are_kept(minilm_dir: Path):
    task = build_task(fetch_bundle(str(minilm_dir)), EmbedTaskSpec(kind="embed"),
                      BatchingSpec(max_tokens=999, max_rows=7), {}, "cuda")
    assert (task.batching.max_tokens, task.batching.max_rows) == (999, 7)

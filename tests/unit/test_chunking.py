"""Chunks of long texts: spans on token and sentence boundaries, overlap, the rows a chunk
list explodes into, and a dead letter that names the chunk that failed."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.models.bundle import open_local_bundle
from pipeline.spec import BatchingSpec, EmbedTaskSpec
from pipeline.tasks import build_task
from pipeline.tasks.chunking import Chunker, explode
from pipeline.tasks.text import load_tokenizer

MINILM = Path(__file__).resolve().parents[2] / "models" / "minilm"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(MINILM / "tokenizer.json"), 256)


def test_token_windows_overlap_and_cover_the_text(tokenizer):
    text = " ".join(f"word{i % 7} river" for i in range(60))
    chunks = Chunker(tokenizer, 16, 4, "tokens").chunks([text])[0]
    assert len(chunks) > 5 and chunks[0].start == 0 and chunks[-1].end == len(text)
    for chunk in chunks:
        real = sum(1 for s in chunk.encoding.special_tokens_mask if not s)
        assert real <= 16 and chunk.encoding.ids[0] == tokenizer.token_to_id("[CLS]")
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.end  # they share 4 tokens of text
        shared = before.encoding.ids[-5:-1]  # the last 4 tokens of text, before [SEP]
        assert after.encoding.ids[1:5] == shared


def test_sentences_are_packed_whole_and_a_long_one_is_cut(tokenizer):
    text = "One two three. Four five six! " + "seven " * 40 + ". Last one?"
    chunks = Chunker(tokenizer, 10, 0, "sentence").chunks([text])[0]
    spans = [text[c.start:c.end] for c in chunks]
    assert spans[0] == "One two three. Four five six!"
    assert spans[-1].endswith("Last one?") and all(len(c.encoding.ids) <= 12 for c in chunks)
    assert sum(1 for s in spans if "seven" in s) >= 4


def test_explode_repeats_the_row_and_keeps_a_bad_row_once():
    kind = pa.list_(pa.struct([("chunk_index", pa.int32()), ("embedding", pa.float32())]))
    table = pa.table({"id": [1, 2, 3], "_chunks": pa.array(
        [[{"chunk_index": 0, "embedding": 0.5}, {"chunk_index": 1, "embedding": 0.25}], None,
         [{"chunk_index": 0, "embedding": 1.0}]], kind), "_error": [None, "bad", None]})
    out = explode(table)
    assert out.to_pydict() == {"id": [1, 1, 2, 3], "_error": [None, None, "bad", None],
                               "chunk_index": [0, 1, None, 0],
                               "embedding": [0.5, 0.25, None, 1.0]}


def test_a_chunk_that_fails_dead_letters_its_row_naming_the_chunk():
    bundle = open_local_bundle(MINILM, str(MINILM))
    spec = EmbedTaskSpec(kind="embed", chunking={"max_tokens": 8})
    task = build_task(bundle, spec, BatchingSpec(), {"input_ids": "tensor(int64)"})
    text = "the river runs to the sea and the sea runs back to the river again"
    prepared = task.prepare(pa.table({"text": [text, "short"]}))
    batch = next(iter(prepared.batches))
    vectors = np.ones((len(batch.feeds["input_ids"]), 384), np.float32)  # pooled in the graph
    long_row = int(np.flatnonzero(batch.rows == 0)[0])
    vectors[batch.spans[long_row] + 1] = np.nan  # its second chunk
    columns, bad = task.finish(batch, [vectors])
    chunk = batch.meta[long_row][1]
    assert bad == {0: f"chunk 1 (characters {chunk.start}-{chunk.end}): model produced "
                      "non-finite values"}
    assert len(columns["_chunks"]) == 1  # the short text's chunk list


def test_every_task_names_the_columns_it_writes_for_clashes_and_merge_keys():
    from pipeline.spec import (
        DetectTaskSpec,
        SparseEmbedTaskSpec,
        TokenClassifyTaskSpec,
        ZeroShotTaskSpec,
        output_clash,
        output_columns,
    )

    zero_shot = ZeroShotTaskSpec(labels=["a", "b"])
    assert "'label' clashes" in output_clash(zero_shot, ["id", "label"])
    chunks = EmbedTaskSpec(kind="embed", chunking={}, output_column="vec")
    assert output_columns(chunks) == ["chunk_index", "chunk_start", "chunk_end", "vec"]
    assert output_columns(EmbedTaskSpec(kind="embed", chunking={"pool": "mean"})) == \
        ["embedding"]
    assert output_columns(TokenClassifyTaskSpec(kind="token-classify")) == ["entities"]
    assert output_columns(SparseEmbedTaskSpec(kind="sparse-embed")) == ["sparse_embedding"]
    assert output_columns(DetectTaskSpec(kind="detect")) == ["detections"]


def test_chunk_rows_write_their_vectors_under_task_output_column():
    import pipeline

    out = pipeline.score(pa.table({"id": [1], "text": ["the river runs to the sea " * 20]}),
                         model=str(MINILM), passthrough=["id"],
                         task={"kind": "embed", "output_column": "vec",
                               "chunking": {"max_tokens": 16}})
    assert out.column_names == ["id", "chunk_index", "chunk_start", "chunk_end", "vec"]
    assert out.num_rows > 3


def test_a_text_of_more_windows_than_max_windows_is_a_dead_letter():
    from pipeline import OnnxPredictor

    case = Path(__file__).resolve().parents[1] / "conformance" / "cases" / "optimum_ner_wordpiece"
    predictor = OnnxPredictor(str(case / "src"), passthrough=["id"], on_bad_row="keep",
                              task={"kind": "token-classify", "long_texts": "stride",
                                    "stride": 8, "max_windows": 2})
    out = predictor(pa.table({"id": [0, 1], "text": ["Anna moved to Oslo.",
                                                      "Anna moved to Oslo. " * 40]}))
    errors = out["_error"].to_pylist()
    assert errors[0] is None and out["entities"][0].as_py()
    assert errors[1].startswith("text makes ") and "more than task.max_windows (2)" in errors[1]

"""The demo text table: real prose of varied length from the standard library's docstrings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.demo import text as demo_text
from pipeline.demo.text import make_text_table


@pytest.fixture(scope="module")
def passages() -> list[tuple[str, str]]:
    return demo_text.stdlib_passages()


@pytest.fixture(scope="module")
def table(passages) -> pa.Table:
    # Reading the standard library is the slow part: do it once for the whole module.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo_text, "stdlib_passages", lambda: passages)
        return make_text_table(300)


def test_passages_are_real_prose(passages):
    assert len(passages) > 1000
    assert all(len(text.split()) >= 3 for _, text in passages)
    assert all(" ".join(text.split()) == text for _, text in passages)


def test_shape_and_schema(table):
    assert table.num_rows == 300
    assert table.schema.names == ["id", "text", "source"]
    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("text").type == pa.string()


def test_ids_are_unique(table):
    ids = table["id"].to_pylist()
    assert len(set(ids)) == 300
    assert ids == list(range(300))


def test_texts_are_non_empty_prose(table):
    texts = table["text"].to_pylist()
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert all(t == t.strip() for t in texts)
    assert len(set(texts)) > 200  # sampled from many passages, not a handful
    assert all(s for s in table["source"].to_pylist())


def test_lengths_vary(table):
    lengths = np.array([len(t) for t in table["text"].to_pylist()])
    assert lengths.max() > 5 * np.median(lengths)
    assert lengths.min() < np.median(lengths) / 2


def test_deterministic_per_seed(table, passages, monkeypatch):
    monkeypatch.setattr(demo_text, "stdlib_passages", lambda: passages)
    assert make_text_table(300).equals(table)
    assert not make_text_table(300, seed=1).equals(table)

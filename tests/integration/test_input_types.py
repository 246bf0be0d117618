"""Input types as today's writers make them: view types (pyarrow, Polars, delta-rs),
dictionary-encoded strings and list views, mixed across the files of one shard, are scored
with their values kept; a column whose types cannot be unified is refused at planning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.arrow_types import plain_table
from pipeline.errors import InputError
from tests.integration.test_embed_job import embed_job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_view_dictionary_and_list_view_columns_in_one_shard(tmp_path: Path, minilm_dir: Path,
                                                             text_rows: list[str]) -> None:
    import polars as pl

    src = tmp_path / "in"
    src.mkdir()
    texts = text_rows[:30]
    # pyarrow with view types, a list view and a dictionary-encoded passthrough column.
    views = pa.table({
        "id": pa.array(range(10), pa.int64()),
        "text": pa.array(texts[:10], pa.string_view()),
        "tags": pa.ListViewArray.from_arrays(pa.array([0] * 10, pa.int32()),
                                             pa.array([i % 3 for i in range(10)], pa.int32()),
                                             pa.array(["a", "b", "c"], pa.string_view())),
        "lang": pa.array(["en", "de"] * 5).dictionary_encode(),
    })
    pq.write_table(views, src / "a.parquet", store_schema=True)
    assert pq.read_schema(src / "a.parquet").field("text").type == pa.string_view()
    # Plain types in the next file: one shard concatenates both.
    plain = pa.table({"id": pa.array(range(10, 20), pa.int64()), "text": texts[10:20],
                      "tags": [["a"] * (i % 3) for i in range(10, 20)],
                      "lang": ["en", "de"] * 5})
    pq.write_table(plain, src / "b.parquet")
    # Polars writes its own view types.
    pl.DataFrame({"id": list(range(20, 30)), "text": texts[20:30],
                  "tags": [["a"] * (i % 3) for i in range(20, 30)],
                  "lang": ["en", "de"] * 5}).write_parquet(src / "c.parquet")

    spec = embed_job(str(src), str(tmp_path / "out"), minilm_dir,
                     passthrough=["id", "text", "tags", "lang"])
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    assert result.report["totals"]["shards"] == 1  # all three files in one shard
    out = result.read().sort_by("id")
    assert out["id"].to_pylist() == list(range(30))
    assert out["text"].to_pylist() == texts  # passthrough values kept
    assert out["text"].type in (pa.string(), pa.large_string())  # no view type left
    assert out["lang"].to_pylist() == ["en", "de"] * 15
    assert out["tags"].to_pylist()[:3] == [["a", "b", "c"][:0], ["a"], ["a", "b"]]
    assert out["tags"].to_pylist()[10:13] == [["a"] * 1, ["a"] * 2, []]
    # The same texts embedded the same way whatever the type they were stored as.
    vectors = np.stack(out["embedding"].to_numpy(zero_copy_only=False))
    reference = pipeline.score(pa.table({"text": texts}), model=str(minilm_dir))
    assert np.allclose(vectors, np.stack(reference["embedding"].to_numpy(zero_copy_only=False)),
                       atol=1e-5)


def test_types_that_cannot_be_unified_are_refused_at_planning(tmp_path: Path,
                                                              minilm_dir: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), src / "a.parquet")
    pq.write_table(pa.table({"id": ["x", "y"], "text": pa.array(["c", "d"], pa.string_view())}),
                   src / "b.parquet", store_schema=True)
    spec = embed_job(str(src), str(tmp_path / "out"), minilm_dir)  # id is passed through
    with pytest.raises(InputError) as caught:
        pipeline.run_job(spec, progress=False)
    message = str(caught.value)
    assert "'id'" in message and "a.parquet" in message and "b.parquet" in message
    assert "int64" in message and "string" in message
    assert not (tmp_path / "out").exists()


def test_plain_table_keeps_values_of_every_view_type() -> None:
    table = pa.table({
        "s": pa.array(["x", None, "z"], pa.string_view()),
        "b": pa.array([b"1", b"", None], pa.binary_view()),
        "d": pa.array(["p", "q", "p"]).dictionary_encode(),
        "lv": pa.LargeListViewArray.from_arrays(pa.array([2, 0, 0], pa.int64()),
                                                pa.array([1, 2, 0], pa.int64()),
                                                pa.array([7, 8, 9])),
        "nested": pa.array([["a"], [], None], pa.list_(pa.string_view())),
    })
    plain = plain_table(table)
    assert [f.type for f in plain.schema] == [pa.string(), pa.binary(), pa.string(),
                                              pa.large_list(pa.int64()), pa.list_(pa.string())]
    assert plain.to_pylist() == table.to_pylist()
    plain.validate(full=True)


def test_task_column_of_another_type_in_one_file_of_a_shard_is_dead_lettered(
        tmp_path: Path, minilm_dir: Path, text_rows: list[str]) -> None:
    """The task judges a wrongly typed column row by row, even when its file shares a shard
    with good files: those rows are dead-lettered with the type named, the rest scored."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(5), pa.int64()), "text": text_rows[:5]}),
                   src / "a.parquet")
    pq.write_table(pa.table({"id": pa.array(range(5, 8), pa.int64()), "text": [1, 2, 3]}),
                   src / "b.parquet")
    spec = embed_job(str(src), str(tmp_path / "out"), minilm_dir, bad_rows={"max_fraction": 0.5})
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    assert result.report["totals"]["shards"] == 1
    assert sorted(result.read()["id"].to_pylist()) == list(range(5))
    reasons = result.report["bad_rows"]["by_reason"]
    assert sum(reasons.values()) == 3 and any("int64" in r for r in reasons), reasons

"""The task families through every entry point a job has: chunked embeddings written a row
per chunk, exactly once when attempts fail after writing their part files; entities, zero-shot
labels and sparse vectors through incremental runs into Delta and Lance tables, equal to what
``pipeline.score`` gives the same rows (real Ray, real converters' models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import pipeline

pytestmark = pytest.mark.usefixtures("ray_cluster")
CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"
WORDS = ["the", "river", "runs", "to", "the", "sea", "and", "the", "sea", "runs", "back", "to",
         "the", "river", "while", "we", "walk"]


def long_texts(count: int) -> list[str]:
    """Texts of 4 to 160 words, with a blank one (a dead letter)."""
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + (i * 37) % 157))
             for i in range(count)]
    texts[7] = "   "
    return texts


def test_chunked_embedding_writes_a_row_per_chunk_exactly_once(tmp_path, minilm_dir,
                                                               monkeypatch):
    texts = long_texts(30)
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": np.arange(30), "text": texts}), data)
    task = {"kind": "embed", "chunking": {"max_tokens": 40, "overlap": 8}}
    spec = {"name": "chunks", "input": {"uri": str(data)}, "model": {"uri": str(minilm_dir)},
            "task": task, "passthrough": ["id"], "sharding": {"rows_per_shard": 10},
            "workers": {"cpu": {"replicas": 1}}, "bad_rows": {"max_fraction": 0.1},
            "output": {"uri": str(tmp_path / "out")}}
    # Every shard's first attempt fails after its part file is written, before its marker.
    monkeypatch.setenv("PIPELINE_FAULTS", json.dumps(
        [{"point": "worker.after_part", "action": "transient", "attempt": 1}]))
    result = pipeline.run_job(spec, progress=False)
    monkeypatch.delenv("PIPELINE_FAULTS")
    assert result.ok and result.report["attempts"]["total"] == 2 * result.report["totals"]["shards"]
    written = result.read().sort_by([("id", "ascending"), ("chunk_index", "ascending")])
    want = pipeline.score(pa.table({"id": np.arange(30), "text": texts}), model=str(minilm_dir),
                          task=task, passthrough=["id"])
    want = want.filter(pc.not_equal(want["id"], 7))
    keys = ["id", "chunk_index", "chunk_start", "chunk_end"]
    assert written.select(keys).to_pylist() == want.select(keys).to_pylist()
    assert np.allclose(np.array(written["embedding"].to_pylist()),
                       np.array(want["embedding"].to_pylist()), atol=1e-5)
    counts = np.bincount(written["id"].to_numpy(), minlength=30)
    assert counts[7] == 0 and counts.max() > 3  # the blank text dead-lettered, long ones cut
    for row in written.to_pylist():  # each chunk's span is words of its own text
        text = texts[row["id"]][row["chunk_start"]:row["chunk_end"]]
        assert text.split() and set(text.split()) <= set(WORDS)
    dead = pq.read_table(next((tmp_path / "out" / "_pipeline" / "dead_letter").glob("*.parquet")))
    assert dead["id"].to_pylist() == [7] and dead["_reason"].to_pylist() == ["text is empty"]
    again = pipeline.run_job(spec, progress=False)
    assert again.ok and again.report["totals"]["run_now"] == 0
    assert again.read().num_rows == written.num_rows


def split_sample(case: str, folder: Path) -> list[dict]:
    """The case's sample rows in two files: a first run reads one, the second both."""
    rows = pq.read_table(CASES / case / "sample.parquet").to_pylist()
    folder.mkdir()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "a.parquet")
    return rows


FAMILIES = [
    ("optimum_ner_bpe", None, "delta", "entities"),
    ("optimum_zero_shot_nli", {"labels": ["sports", "music", "travel"]}, "delta",
     "probabilities"),
    ("sentence_transformers_splade", None, "lance", "sparse_embedding"),
    ("ultralytics_yolo_raw", None, "lance", "detections"),
    ("optimum_detr_detector", None, "lance", "detections"),
    ("optimum_clip_zero_shot", {"labels": ["disc", "bar", "box"]}, "delta", "probabilities"),
]


@pytest.mark.parametrize(("case", "task", "fmt", "column"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_task_families_run_incrementally_into_tables(case, task, fmt, column, tmp_path):
    data = tmp_path / "in"
    rows = split_sample(case, data)
    spec = {"name": case, "input": {"uri": str(data)}, "model": {"uri": str(CASES / case / "src")},
            "passthrough": ["id"], "workers": {"cpu": {"replicas": 1}},
            "bad_rows": {"max_fraction": 0.5},
            "output": {"uri": str(tmp_path / "out"), "format": fmt, "mode": "incremental"}}
    if task:
        spec["task"] = task
    first = pipeline.run_job(spec, progress=False)
    assert first.ok
    pq.write_table(pa.Table.from_pylist(rows[len(rows) // 2:]), data / "b.parquet")
    second = pipeline.run_job(spec, progress=False)
    assert second.ok and second.report["totals"]["run_now"] == 1  # b only
    table = second.read().sort_by("id")
    want = pipeline.score(pa.Table.from_pylist(rows), model=str(CASES / case / "src"), task=task,
                          passthrough=["id"])
    want = want.filter(pc.is_in(want["id"], table["id"]))
    assert table["id"].to_pylist() == want["id"].to_pylist()
    assert len(table) >= len(rows) - 1  # at most the empty text of the zero-shot sample
    assert table.schema.field(column).type == want.schema.field(column).type or fmt != "lance"
    got, expected = table[column].to_pylist(), want[column].to_pylist()
    assert json.dumps(got, sort_keys=True, default=str) != "[]"
    for g, w in zip(got, expected, strict=True):
        assert _close(g, w), (g, w)


def test_detections_of_a_folder_of_images_with_no_task_block(tmp_path):
    """input.format images: the files themselves, as ultralytics reads them from disk."""
    case = CASES / "ultralytics_yolo26_end2end"
    sample = pq.read_table(case / "sample.parquet").to_pylist()
    folder = tmp_path / "photos"
    folder.mkdir()
    for row in sample:
        (folder / row["name"]).write_bytes(row["image"])
    spec = {"name": "photos", "input": {"uri": str(folder), "format": "images"},
            "model": {"uri": str(case / "src")}, "passthrough": ["path"],
            "workers": {"cpu": {"replicas": 1}}, "output": {"uri": str(tmp_path / "out")}}
    result = pipeline.run_job(spec, progress=False)
    assert result.ok
    squared = json.loads((case / "case.json").read_text())["squared"]
    assert result.report["row_notes"] == {
        "letterboxed to the full square: the end-to-end head needs more anchors than its "
        "stride rectangle has": len(squared)}
    want = dict(zip([r["name"] for r in sample],
                    pq.read_table(case / "reference.parquet")["detections"].to_pylist(),
                    strict=True))
    got = {Path(r["path"]).name: r["detections"] for r in result.read().to_pylist()}
    assert got.keys() == want.keys() and sum(map(len, want.values())) > 0
    for name, detections in got.items():
        assert [d["label"] for d in detections] == [d["label"] for d in want[name]]
        for g, w in zip(detections, want[name], strict=True):
            assert abs(g["score"] - w["score"]) <= 1e-4
            assert np.abs(np.array(g["box"]) - np.array(w["box"])).max() <= 1.0


def _close(got, want) -> bool:
    if isinstance(want, dict):
        return all(_close(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return len(got) == len(want) and all(_close(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, float):
        return abs(got - want) <= 1e-5
    return got == want

"""The Lance sink with real lance, real files and the real S3 endpoint (moto): shards written
through the sink's ShardWriter, runs committed as single Lance versions."""

from __future__ import annotations

import os
import tempfile

import lance
import numpy as np
import pyarrow as pa
import pytest

from pipeline.commit import ShardWriter
from pipeline.errors import OutputError, ShardError
from pipeline.layout import OutputLayout
from pipeline.sinks.base import RunCommit
from pipeline.sinks.lance_sink import LanceSink
from pipeline.sinks.object_store import object_store_options
from pipeline.spec import IndexSpec
from pipeline.state import ShardMarker
from tests.support.leftovers import files_under
from tests.support.records import marker_for

FINGERPRINT = "fp-test"


@pytest.fixture(autouse=True)
def local_tmp(tmp_path, monkeypatch):
    """The sink stages part files under tempfile.gettempdir(): a folder of this test's."""
    folder = tmp_path / "local-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def rows(start: int, n: int, dim: int = 4, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed + start)
    flat = pa.array(rng.random(n * dim, dtype=np.float32), pa.float32())
    return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})


def writer_for(sink: LanceSink, layout: OutputLayout, sid: str) -> ShardWriter:
    """The shard writer a worker of a Lance job opens for ``sid``."""
    meta = {b"pipeline.fingerprint": FINGERPRINT.encode(), b"pipeline.shard_id": sid.encode()}
    return ShardWriter(layout, sid, "zstd", meta, sink.part_files(layout, sid))


def write_shard(sink: LanceSink, layout: OutputLayout, sid: str, table: pa.Table,
                windows: int = 1) -> ShardMarker:
    """One attempt that commits the shard; returns its marker as storage holds it."""
    with writer_for(sink, layout, sid) as writer:
        step = max(1, -(-table.num_rows // windows))
        for start in range(0, max(table.num_rows, 1), step):
            writer.write(table.slice(start, step))
        marker, ours = writer.commit(marker_for(sid, fingerprint=FINGERPRINT))
    assert ours
    on_storage = layout.committed_marker(sid)
    assert on_storage == marker
    return on_storage


def data_files(path: str) -> set[str]:
    folder = os.path.join(path, "data")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def ids(table: pa.Table) -> list[int]:
    return sorted(table["id"].to_pylist())


def test_runs_commit_once_each_and_drop_shards(tmp_path, local_tmp):
    root = tmp_path / "out"
    layout = OutputLayout(f"file://{root}")
    sink = LanceSink(tag_runs=True)
    a = write_shard(sink, layout, "a", rows(0, 10), windows=3)
    b = write_shard(sink, layout, "b", rows(100, 0))
    c = write_shard(sink, layout, "c", rows(200, 7))
    assert a["lance"]["rows"] == 10 and len(a["lance"]["fragments"]) == 1
    assert b["lance"]["rows"] == 0 and b["lance"]["fragments"] == []
    assert lance_versions(root) == []  # fragments are written, nothing is committed yet
    assert not list((root / "part-a.parquet").parent.glob("part-*"))  # no Parquet output

    run1 = RunCommit(1, FINGERPRINT, live={"a": a, "b": b, "c": c})
    result = sink.commit_run(layout, run1)
    assert result["committed"] and result["version"] == 1 and result["rows"] == 17
    assert result["added_fragments"] == 2 and result["removed_fragments"] == 0
    ds = lance.dataset(str(root))
    assert ids(ds.to_table()) == list(range(10)) + list(range(200, 207))
    assert ds.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert ds.schema.metadata == {b"pipeline.fingerprint": FINGERPRINT.encode()}
    assert ds.tags.list()["run-1"]["version"] == 1
    assert set(os.listdir(root)) - {"_pipeline"} <= set(sink.table_dirs())

    again = sink.commit_run(layout, run1)  # a crash right after the commit, then a retry
    assert not again["committed"] and again["version"] == 1 and again["rows"] == 17
    assert lance_versions(root) == [1]

    d = write_shard(sink, layout, "d", rows(300, 5))
    run2 = RunCommit(2, FINGERPRINT, live={"a": a, "b": b, "d": d}, dropped={"c": c})
    result = sink.commit_run(layout, run2)
    assert result["committed"] and result["version"] == 2 and result["rows"] == 15
    assert result["added_fragments"] == 1 and result["removed_fragments"] == 1
    assert lance_versions(root) == [1, 2]
    assert {n: t["version"] for n, t in lance.dataset(str(root)).tags.list().items()} == \
        {"run-1": 1, "run-2": 2}
    assert ids(sink.read(layout)) == list(range(10)) + list(range(300, 305))
    assert ids(lance.dataset(str(root), version=1).to_table()) == \
        list(range(10)) + list(range(200, 207))
    assert lance.dataset(str(root)).read_transaction(2).transaction_properties[
        "pipeline.run_id"] == "2"
    assert sink.commit_run(layout, run2)["version"] == 2
    assert lance_versions(root) == [1, 2]
    assert files_under(local_tmp) == []  # every staged part file is gone

    # Rows of another shape fail their shard for good (no retry mends them), unseen.
    with pytest.raises(ShardError, match="do not fit the Lance dataset") as failed:
        write_shard(sink, layout, "e", rows(400, 3, dim=8))
    assert not failed.value.transient and layout.committed_marker("e") is None
    assert files_under(local_tmp) == [] and lance_versions(root) == [1, 2]


def lance_versions(root) -> list[int]:
    try:
        return [v["version"] for v in lance.dataset(str(root)).versions()]
    except ValueError:
        return []


def test_uncommitted_fragments_stay_invisible(tmp_path, local_tmp):
    root = tmp_path / "out"
    layout = OutputLayout(str(root))
    sink = LanceSink()
    a = write_shard(sink, layout, "a", rows(0, 6))
    sink.commit_run(layout, RunCommit(1, FINGERPRINT, live={"a": a}))
    files = data_files(str(root))

    # An attempt that ends without a commit publishes fragments but no marker (as a crash).
    with writer_for(sink, layout, "x") as writer:
        writer.write(rows(500, 4))
    assert layout.committed_marker("x") is None
    assert len(data_files(str(root)) - files) == 1
    # A shard committed by a worker but not part of the run (e.g. outside the plan).
    y = write_shard(sink, layout, "y", rows(600, 3))
    # A late attempt for a committed shard: its fragment is written (before the commit step,
    # outside the lock) but the first marker stands, and no commit ever names the fragment.
    with writer_for(sink, layout, "a") as late:
        late.write(rows(900, 8))
        marker, ours = late.commit(marker_for("a", attempt_token="late"))
    assert not ours and marker["attempt_token"] == "tok-a"
    assert layout.committed_marker("a")["lance"] == a["lance"]
    assert len(data_files(str(root)) - files) == 3  # x, y and the late attempt's

    result = sink.commit_run(layout, RunCommit(2, FINGERPRINT, live={"a": a}))
    assert not result["committed"] and result["rows"] == 6
    assert result["tag"] is None and lance.dataset(str(root)).tags.list() == {}  # opt-in
    assert ids(lance.dataset(str(root)).to_table()) == list(range(6))
    assert y["lance"]["rows"] == 3  # its fragment exists, recorded, yet never committed
    assert files_under(local_tmp) == []  # the late attempt's staged file too


def test_a_run_on_s3(s3_bucket, s3_options):
    uri = f"s3://{s3_bucket}/out"
    layout = OutputLayout(uri, s3_options)
    sink = LanceSink()
    a = write_shard(sink, layout, "a", rows(0, 12))
    b = write_shard(sink, layout, "b", rows(50, 0))
    c = write_shard(sink, layout, "c", rows(100, 4))
    result = sink.commit_run(layout, RunCommit(1, FINGERPRINT, live={"a": a, "b": b, "c": c}))
    assert result["version"] == 1 and result["rows"] == 16
    options = object_store_options(uri, s3_options)
    assert ids(lance.dataset(uri, storage_options=options).to_table()) == \
        list(range(12)) + list(range(100, 104))
    assert sink.commit_run(layout, RunCommit(1, FINGERPRINT, live={"a": a, "b": b, "c": c}))[
        "version"] == 1

    result = sink.commit_run(layout, RunCommit(2, FINGERPRINT, live={"a": a, "b": b},
                                               dropped={"c": c}))
    assert result["version"] == 2 and result["removed_fragments"] == 1
    ds = lance.dataset(uri, storage_options=options)
    assert [v["version"] for v in ds.versions()] == [1, 2]
    assert ids(sink.read(layout)) == list(range(12))
    assert ids(lance.dataset(uri, version=1, storage_options=options).to_table()) == \
        list(range(12)) + list(range(100, 104))


def test_cosine_vector_index_answers_nearest_neighbour_queries(tmp_path):
    root = tmp_path / "out"
    layout = OutputLayout(str(root))
    sink = LanceSink()
    first, second = rows(0, 180, dim=16), rows(180, 120, dim=16)
    live = {"a": write_shard(sink, layout, "a", first), "b": write_shard(sink, layout, "b", second)}
    spec = IndexSpec(column="embedding", metric="cosine", type="IVF_PQ", num_partitions=1,
                     num_sub_vectors=4)
    result = sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live, index=spec))
    assert result["index"]["built"] and result["index"]["indexed_rows"] == 300
    assert result["data_version"] == 1 and result["version"] == 2  # the index is a version
    ds = lance.dataset(str(root))
    (described,) = ds.describe_indices()
    assert described.name == "embedding_idx" and described.details["metric_type"] == "COSINE"

    query = second["embedding"][42].values.to_numpy()
    nearest = {"column": "embedding", "q": query, "k": 3, "refine_factor": 20}
    assert "ANN" in ds.scanner(nearest=nearest, columns=["id"]).explain_plan()
    hits = ds.to_table(nearest=nearest, columns=["id", "_distance"])
    assert hits["id"][0].as_py() == 222 and hits["_distance"][0].as_py() < 1e-5
    scaled = ds.to_table(nearest={**nearest, "q": query * 3.0}, columns=["id", "_distance"])
    assert scaled["id"][0].as_py() == 222  # cosine: the length of the query does not matter

    again = sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live, index=spec))
    assert not again["index"]["built"] and again["version"] == 2


def test_too_few_rows_for_an_index_is_a_note(tmp_path):
    root = tmp_path / "out"
    layout = OutputLayout(str(root))
    sink = LanceSink()
    live = {"a": write_shard(sink, layout, "a", rows(0, 20, dim=16))}
    result = sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live,
                                               index=IndexSpec(metric="cosine")))
    assert result["rows"] == 20 and result["version"] == 1
    assert result["index"]["built"] is False
    assert "20 rows" in result["index"]["note"] and "at least 256" in result["index"]["note"]
    assert lance.dataset(str(root)).describe_indices() == []


def test_bad_index_or_mixed_schemas_fail_before_any_commit(tmp_path):
    root = tmp_path / "out"
    layout = OutputLayout(str(root))
    sink = LanceSink()
    live = {"a": write_shard(sink, layout, "a", rows(0, 5, dim=16))}
    with pytest.raises(OutputError, match="num_sub_vectors: 5 does not divide"):
        sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live,
                                          index=IndexSpec(num_sub_vectors=5)))
    with pytest.raises(OutputError, match="'id' is int64"):
        sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live,
                                          index=IndexSpec(column="id")))
    live["b"] = write_shard(sink, layout, "b", rows(10, 5, dim=8))
    with pytest.raises(OutputError, match="shard b has columns"):
        sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live))
    assert lance_versions(root) == []


def test_a_compacted_dataset_is_refused_rather_than_duplicated(tmp_path):
    root = tmp_path / "out"
    layout = OutputLayout(str(root))
    sink = LanceSink()
    live = {sid: write_shard(sink, layout, sid, rows(i * 10, 5)) for i, sid in enumerate("ab")}
    sink.commit_run(layout, RunCommit(1, FINGERPRINT, live=live))
    lance.dataset(str(root)).optimize.compact_files()  # rewrites a and b into one new file
    assert lance.dataset(str(root)).count_rows() == 10
    # The markers' files are gone from the dataset: re-adding them would duplicate 10 rows.
    live["c"] = write_shard(sink, layout, "c", rows(100, 5))
    with pytest.raises(OutputError, match="no shard marker names"):
        sink.commit_run(layout, RunCommit(2, FINGERPRINT, live=live))
    assert lance.dataset(str(root)).count_rows() == 10

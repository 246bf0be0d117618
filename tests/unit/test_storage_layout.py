"""Storage edge cases: failed uploads never publish, job folders are never read as input."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.commit import OutputLayout
from pipeline.listing import list_input_files


def test_failed_local_write_leaves_no_file(tmp_path):
    fs = fsspec.filesystem("file")
    target = str(tmp_path / "part-1.parquet")
    with pytest.raises(RuntimeError), storage.atomic_writer(fs, target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_job_bookkeeping_is_never_input(tmp_path):
    table = pa.table({"id": [1]})
    pq.write_table(table, tmp_path / "part-a.parquet")
    (tmp_path / "_pipeline" / "dead_letter").mkdir(parents=True)
    (tmp_path / "_pipeline" / "shards").mkdir()
    pq.write_table(table, tmp_path / "_pipeline" / "dead_letter" / "a.parquet")
    (tmp_path / "_pipeline" / "shards" / "a.json").write_text("{}")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden").mkdir()
    pq.write_table(table, tmp_path / ".hidden" / "x.parquet")
    files = list_input_files(str(tmp_path), None, {})
    assert [f.uri.rsplit("/", 1)[-1] for f in files] == ["part-a.parquet"]


def test_orphaned_parts_are_removed(tmp_path):
    layout = OutputLayout(str(tmp_path))
    for sid in ("keep", "orphan"):
        with layout.shard_writer(sid, "zstd", {}) as out:
            out.write(pa.table({"id": [1]}))
            out.write_dead(pa.table({"id": [1], "_reason": ["x"]}))
    assert layout.remove_orphans({"keep"}) == 2
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-keep.parquet"]
    assert [p.name for p in (tmp_path / "_pipeline" / "dead_letter").iterdir()] == ["keep.parquet"]

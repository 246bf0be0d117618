"""Storage edge cases: failed uploads never publish, job folders are never read as input."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.commit import ShardWriter
from pipeline.layout import BrokenMarker, OutputLayout
from pipeline.listing import list_input_files
from tests.support.records import marker_for


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
        with ShardWriter(layout, sid, "zstd", {}) as out:
            out.write(pa.table({"id": [1]}))
            out.write_dead(pa.table({"id": [1], "_reason": ["x"]}))
    assert layout.remove_orphans({"keep"}) == 2
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-keep.parquet"]
    assert [p.name for p in (tmp_path / "_pipeline" / "dead_letter").iterdir()] == ["keep.parquet"]


def test_a_broken_marker_is_replaced_by_the_attempt_that_commits(tmp_path):
    layout = OutputLayout(str(tmp_path))
    (tmp_path / "_pipeline" / "shards").mkdir(parents=True)
    (tmp_path / "_pipeline" / "shards" / "s1.json").write_bytes(b"")  # there, but not a marker
    broken = layout.committed_marker("s1")
    assert isinstance(broken, BrokenMarker) and broken.reason.startswith("not JSON (0 bytes)")
    with ShardWriter(layout, "s1", "zstd", {}) as out:
        out.write(pa.table({"id": [7]}))
        committed, ours = out.commit(marker_for("s1", attempt=2, attempt_token="t2"))
    assert ours and committed.attempt == 2
    assert layout.committed_marker("s1").attempt_token == "t2"
    assert pq.read_table(tmp_path / "part-s1.parquet")["id"].to_pylist() == [7]


def test_checksum_mismatches_are_retried():
    from pipeline.errors import classify_io_error

    err = classify_io_error(RuntimeError("FlexibleChecksumError: Expected checksum x did not "
                                         "match calculated checksum: AAAAAA=="), "reading m")
    assert err.transient


def test_a_json_object_that_is_no_marker_is_broken_but_a_newer_marker_is_refused(tmp_path):
    from pipeline.errors import OutputError

    layout = OutputLayout(str(tmp_path))
    (tmp_path / "_pipeline" / "shards").mkdir(parents=True)
    (tmp_path / "_pipeline" / "shards" / "s1.json").write_text('{"note": "not a marker"}')
    assert isinstance(layout.committed_marker("s1"), BrokenMarker)
    newer = {**marker_for("s1").to_dict(), "format_version": 99}
    (tmp_path / "_pipeline" / "shards" / "s1.json").write_text(json.dumps(newer))
    with pytest.raises(OutputError, match="format version 99"):
        layout.committed_marker("s1")


def test_dead_letters_keep_their_column_order(tmp_path):
    from pipeline.dead_letters import dead_letter_table

    table = pa.table({"id": [1, 2, 3], "text": ["a", "", "c"], "other": [0, 0, 0]})
    dead = dead_letter_table(table, {2: "empty text", 1: "null"}, ["id", "text", "missing"],
                             before_reason={"_row": lambda rows: pa.array(rows)},
                             after_reason={"_shard_id": lambda rows: pa.array(["s"] * len(rows))})
    assert dead.column_names == ["id", "text", "_row", "_reason", "_shard_id"]
    assert dead.to_pydict() == {"id": [2, 3], "text": ["", "c"], "_row": [1, 2],
                                "_reason": ["null", "empty text"], "_shard_id": ["s", "s"]}
    assert dead_letter_table(table, {}, None) is None


def test_throttling_as_s3fs_words_it_is_retried():
    """s3fs raises OSError(EBUSY, "Service Unavailable") for SlowDown, ServiceUnavailable and
    503 (seen in the S3 fault trial: a shard given up on instead of retried)."""
    import errno

    from pipeline.errors import classify_io_error

    assert classify_io_error(OSError(errno.EBUSY, "Service Unavailable"), "writing x").transient
    assert classify_io_error(OSError(errno.EAGAIN, "try again"), "reading x").transient
    assert not classify_io_error(OSError(errno.EISDIR, "Is a directory"), "reading x").transient

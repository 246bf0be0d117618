"""What killed attempts leave behind is cleaned when a job completes: temp files on local
disks, unfinished multipart uploads on S3 (which S3 would otherwise keep and bill)."""

from __future__ import annotations

import pyarrow as pa
import s3fs

from pipeline.commit import ShardWriter
from pipeline.layout import OutputLayout
from pipeline.storage import StagedFile
from tests.support.records import marker_for


def test_temp_files_of_killed_attempts_are_removed(tmp_path):
    layout = OutputLayout(str(tmp_path))
    with ShardWriter(layout, "keep", "zstd", {}) as out:
        out.write(pa.table({"id": [1]}))
        out.commit(marker_for("keep", attempt_token="a"))
    (tmp_path / ".tmp-dead-part-x.parquet").write_bytes(b"half")
    (tmp_path / "_pipeline" / "shards" / ".tmp-dead-x.json").write_bytes(b"{")
    (tmp_path / "notes.txt").write_text("not ours")
    layout.remove_orphans({"keep"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["_pipeline", "notes.txt", "part-keep.parquet"]
    assert [p.name for p in (tmp_path / "_pipeline" / "shards").iterdir()
            if not p.name.startswith(".commit")] == ["keep.json"]


def test_unfinished_multipart_uploads_are_aborted(s3_options, s3_bucket):
    fs = s3fs.S3FileSystem(**s3_options)
    out = f"s3://{s3_bucket}/out"
    staged = StagedFile(fs, f"{s3_bucket}/out/part-dead.parquet")  # an attempt that was killed
    staged.fh.write(b"x" * 100)
    staged.finish()
    other = StagedFile(fs, f"{s3_bucket}/elsewhere/file")  # not below the output: left alone
    other.fh.write(b"y")
    other.finish()

    def pending(prefix: str) -> list[str]:
        listed = fs.call_s3("list_multipart_uploads", Bucket=s3_bucket, Prefix=prefix)
        return [u["Key"] for u in listed.get("Uploads", [])]

    assert pending("out/") == ["out/part-dead.parquet"]
    OutputLayout(out, s3_options).remove_orphans(set())
    assert pending("out/") == [] and pending("elsewhere/") == ["elsewhere/file"]
    assert not fs.exists(f"{s3_bucket}/out/part-dead.parquet")

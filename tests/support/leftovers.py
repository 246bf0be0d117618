"""What a finished or killed attempt must not leave behind."""

from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.layout import OutputLayout


def leftovers(layout: OutputLayout) -> list[str]:
    """Temp files (local) or multipart uploads never completed nor aborted (S3)."""
    if storage.protocol_of(layout.fs) == "file":
        return [str(p) for p in Path(layout.root).rglob(".tmp-*")]
    bucket = layout.root.split("/", 1)[0]
    uploads = layout.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    return [u["Key"] for u in uploads]


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` (a staging folder must be empty once attempts are done)."""
    return [str(p) for p in folder.rglob("*") if p.is_file()]

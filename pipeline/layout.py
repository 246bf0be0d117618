"""The output layout on storage: where every file of an output lives, and typed reads of them.

    <output>/part-<shard>.parquet            written first (atomically)
    <output>/_pipeline/dead_letter/<shard>.parquet
    <output>/_pipeline/shards/<shard>.json   written last for a shard: the commit point
    <output>/_pipeline/job.json, report.json, plan.json, runs/<run>.json
    <output>/_pipeline/lease.json            the driver that holds the output (pipeline.lease)
    <output>/_SUCCESS                        written last for the job

Storage state is the truth: resume lists the markers. Writing a shard's files and its marker
in the right order is ``pipeline.commit``'s job; this module only knows the places.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.errors import OutputError, describe_access
from pipeline.state import FIRST_VERSIONED, FORMAT_VERSION, JobDocument, JobReport, ShardMarker

JOB_FILE = "job.json"
REPORT_FILE = "report.json"
PLAN_FILE = "plan.json"
LEASE_FILE = "lease.json"  # not output: a wipe keeps it, and it alone is no earlier output


@dataclass(frozen=True)
class BrokenMarker:
    """A marker file that exists but holds no marker (an empty or cut body)."""

    reason: str


def _marker_bytes(marker: ShardMarker) -> bytes:
    return json.dumps(marker.to_dict(), indent=1, default=str).encode()


# A shard's part file: ``part-<shard id>.parquet`` (a shard id has no dot). Data files that
# Spark and delta-rs write (``part-00000-<uuid>-c000[.snappy].parquet``) never match, so a
# table sink or orphan removal never takes another writer's files for its own.
PART_FILE = re.compile(r"^part-([^./]+)\.parquet$")
FOREIGN_PART = re.compile(r"^\d{5}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def shard_of_part(name: str) -> str | None:
    """The shard id of a part file's name (its last path segment), None for other files."""
    match = PART_FILE.match(name.rstrip("/").rsplit("/", 1)[-1])
    if match is None or FOREIGN_PART.match(match.group(1)):
        return None
    return match.group(1)


class OutputLayout:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, root = storage.filesystem(uri, storage_options)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def pipeline_path(self, *parts: str) -> str:
        return self._path("_pipeline", *parts)

    def part_path(self, shard_id: str) -> str:
        return self._path(f"part-{shard_id}.parquet")

    def marker_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "shards", f"{shard_id}.json")

    def dead_letter_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "dead_letter", f"{shard_id}.parquet")

    # ------------------------------------------------------------------ shard commits

    def shards_folder(self) -> str:
        return self._path("_pipeline", "shards")

    def create_marker(self, marker: ShardMarker) -> bool:
        """Commit a shard: create its marker unless one exists (False: another attempt did)."""
        return storage.create_exclusive(self.fs, self.marker_path(marker.shard_id),
                                        _marker_bytes(marker))

    def committed_marker(self, shard_id: str) -> ShardMarker | BrokenMarker | None:
        """The shard's marker as storage holds it now (no listing cache): None when there is
        none, a ``BrokenMarker`` when the file exists but holds no marker (cut short)."""
        path = self.marker_path(shard_id)
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        try:
            data = self.fs.cat_file(path)  # one GET on object stores
        except FileNotFoundError:
            return None
        except Exception as exc:
            if "checksum" not in str(exc).lower():
                raise
            return BrokenMarker(f"checksum mismatch: {exc}")
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            return BrokenMarker(f"not JSON ({len(data)} bytes): {exc}")
        if not isinstance(parsed, dict):
            return BrokenMarker("not a JSON object")
        if int(parsed.get("format_version") or FIRST_VERSIONED) > FORMAT_VERSION:
            return ShardMarker.read(parsed, path)  # refused in one line: never replace it
        try:
            return ShardMarker.read(parsed, path)
        except OutputError as exc:  # JSON, but no marker (a cut or foreign body)
            return BrokenMarker(str(exc))

    def replace_marker(self, marker: ShardMarker) -> None:
        storage.write_bytes_atomic(self.fs, self.marker_path(marker.shard_id),
                                   _marker_bytes(marker))

    def committed_shards(self) -> set[str]:
        folder = self.shards_folder()
        self.fs.invalidate_cache(folder)  # other processes wrote there: never trust a listing cache
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        # Temp files of a marker being written (".tmp-...") are not commits.
        return {base[:-5] for n in names
                if (base := n.rsplit("/", 1)[-1]).endswith(".json") and not base.startswith(".")}

    def read_marker(self, shard_id: str) -> ShardMarker:
        path = self.marker_path(shard_id)
        with self.fs.open(path, "rb") as fh:
            return ShardMarker.read(json.loads(fh.read()), path)

    def read_markers(self, shard_ids: list[str]) -> dict[str, ShardMarker]:
        """Markers of committed shards, fetched concurrently where fsspec can."""
        if not shard_ids:
            return {}
        blobs = self.fs.cat([self.marker_path(s) for s in shard_ids], on_error="raise")
        return {p.rsplit("/", 1)[-1][:-5]: ShardMarker.read(json.loads(b), p)
                for p, b in blobs.items()}

    # ------------------------------------------------------------------ job files

    def read_job(self) -> JobDocument | None:
        data = self.read_json(JOB_FILE)
        return None if data is None else JobDocument.read(data, self.pipeline_path(JOB_FILE))

    def write_job(self, document: JobDocument) -> None:
        self.write_json(JOB_FILE, document.to_dict())

    def write_report(self, report: JobReport) -> None:
        self.write_json(REPORT_FILE, report.to_dict())

    def read_report(self) -> JobReport | None:
        data = self.read_json(REPORT_FILE)
        return None if data is None else JobReport.read(data, self.pipeline_path(REPORT_FILE))

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._path("_pipeline", name), "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError as exc:
            if describe_access(exc) is not None:  # the bucket itself is missing
                raise
            return None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        payload = json.dumps(data, indent=2, default=str).encode()
        storage.write_bytes_atomic(self.fs, self._path("_pipeline", name), payload)

    def write_success(self) -> None:
        storage.write_bytes_atomic(self.fs, self._path("_SUCCESS"), b"")

    def clear_success(self) -> None:
        if self.fs.exists(self._path("_SUCCESS")):
            self.fs.rm(self._path("_SUCCESS"))

    def has_output(self) -> bool:
        """Part files, ``_SUCCESS`` or anything under ``_pipeline/`` but the lease."""
        self.fs.invalidate_cache(self.root)
        try:
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return False
        if any(n.startswith(("part-", "_SUCCESS")) for n in names):
            return True
        return "_pipeline" in names and bool(self._pipeline_entries())

    def _pipeline_entries(self) -> list[str]:
        """What ``_pipeline/`` holds, the lease left out."""
        folder = self._path("_pipeline")
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return [n for n in names if n.rstrip("/").rsplit("/", 1)[-1] != LEASE_FILE]

    def remove_orphans(self, keep: set[str], parts: bool = True) -> int:
        """Delete part and dead-letter files of shards outside the plan (left by a failed
        attempt before the input or sharding changed), so the folder holds one job's rows;
        and what killed attempts left: temp files, unfinished multipart uploads. Called when
        the job's workers are gone."""
        removed = storage.abort_uploads(self.fs, self.root)
        # Table outputs (parts=False): a part file outside the plan may be one an earlier
        # table version reads; only temp files go (vacuum removes the rest).
        for folder, prefix, suffix in ((self.root, "part-" if parts else "\0", ".parquet"),
                                       (self._path("_pipeline", "dead_letter"), "", ".parquet"),
                                       (self.shards_folder(), "\0", "")):
            self.fs.invalidate_cache(folder)
            try:
                names = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            # Only our own part files: a table writer's files at the root (delta-rs writes
            # part-00000-<uuid>-c000.parquet there on a merge) are the table's.
            doomed = [name for name in names
                      if (base := name.rstrip("/").rsplit("/", 1)[-1]).startswith(".tmp-")
                      or (base.startswith(prefix) and base.endswith(suffix)
                          and (prefix != "part-" or shard_of_part(base) is not None)
                          and base[len(prefix):len(base) - len(suffix)] not in keep)]
            if doomed:  # one call: object stores delete in batches (S3: 1,000 per request)
                self.fs.rm(doomed)
            removed += len(doomed)
        return removed

    def wipe(self, table_dirs: tuple[str, ...] = ()) -> None:
        """Remove what a job writes (and nothing else that may live in the folder); a table
        output's folders too (``table_dirs``: ``_delta_log``, Lance's), history included."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        doomed = [name for name in names
                  if (base := name.rstrip("/").rsplit("/", 1)[-1]).startswith("part-")
                  or base == "_SUCCESS"]
        if doomed:  # one call: object stores delete in batches (S3: 1,000 per request)
            self.fs.rm(doomed)
        present = {name.rstrip("/").rsplit("/", 1)[-1] for name in names}
        for folder in table_dirs:
            if folder in present:
                self.fs.rm(self._path(folder), recursive=True)  # batched the same way
        entries = self._pipeline_entries() if "_pipeline" in present else []
        if entries:  # all of _pipeline/ but the lease of the run that wipes
            self.fs.rm(entries, recursive=True)
        self.fs.invalidate_cache(self.root)

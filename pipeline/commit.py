"""The output layout on storage, and every write into it.

    <output>/part-<shard>.parquet            written first (atomically)
    <output>/_pipeline/dead_letter/<shard>.parquet
    <output>/_pipeline/shards/<shard>.json   written last for a shard: the commit point
    <output>/_pipeline/job.json, report.json
    <output>/_SUCCESS                        written last for the job

Storage state is the truth: resume lists the markers. Local writes are temp-file + rename;
object stores write each object in one PUT, so no reader ever sees half a file.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError

META_FINGERPRINT = b"pipeline.fingerprint"
META_MODEL = b"pipeline.model_sha256"
META_SHARD = b"pipeline.shard_id"


class OutputLayout:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, root = storage.filesystem(uri, storage_options)
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def part_path(self, shard_id: str) -> str:
        return self._path(f"part-{shard_id}.parquet")

    def marker_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "shards", f"{shard_id}.json")

    def dead_letter_path(self, shard_id: str) -> str:
        return self._path("_pipeline", "dead_letter", f"{shard_id}.parquet")

    # ------------------------------------------------------------------ shard commits

    def write_part(self, shard_id: str, table: pa.Table, compression: str,
                   metadata: dict[bytes, bytes]) -> int:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        with storage.atomic_writer(self.fs, self.part_path(shard_id)) as fh:
            pq.write_table(table, fh, compression=None if compression == "none" else compression)
        return table.num_rows

    def write_dead_letter(self, shard_id: str, table: pa.Table | None) -> None:
        path = self.dead_letter_path(shard_id)
        if table is None or table.num_rows == 0:
            # A stale file from an earlier attempt must not outlive a clean retry.
            if self.fs.exists(path):
                self.fs.rm(path)
            return
        with storage.atomic_writer(self.fs, path) as fh:
            pq.write_table(table, fh, compression="zstd")

    def write_marker(self, shard_id: str, marker: dict[str, Any]) -> None:
        data = json.dumps(marker, indent=1, default=str).encode()
        storage.write_bytes_atomic(self.fs, self.marker_path(shard_id), data)

    def committed_shards(self) -> set[str]:
        folder = self._path("_pipeline", "shards")
        self.fs.invalidate_cache(folder)  # other processes wrote there: never trust a listing cache
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        return {n.rsplit("/", 1)[-1][:-5] for n in names if n.endswith(".json")}

    def read_marker(self, shard_id: str) -> dict[str, Any]:
        with self.fs.open(self.marker_path(shard_id), "rb") as fh:
            return json.loads(fh.read())

    # ------------------------------------------------------------------ job files

    def read_job(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self._path("_pipeline", "job.json"), "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
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
        self.fs.invalidate_cache(self.root)
        try:
            return any(n.rsplit("/", 1)[-1].startswith(("part-", "_pipeline", "_SUCCESS"))
                       for n in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return False

    def remove_orphans(self, keep: set[str]) -> int:
        """Delete part and dead-letter files of shards outside the plan (left by a failed
        attempt before the input or sharding changed), so the folder holds one job's rows."""
        removed = 0
        for folder, prefix, suffix in ((self.root, "part-", ".parquet"),
                                       (self._path("_pipeline", "dead_letter"), "", ".parquet")):
            self.fs.invalidate_cache(folder)
            try:
                names = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            for name in names:
                base = name.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith(prefix) and base.endswith(suffix) and \
                        base[len(prefix):-len(suffix)] not in keep:
                    self.fs.rm(name)
                    removed += 1
        return removed

    def wipe(self) -> None:
        """Remove what a job writes (and nothing else that may live in the folder)."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("part-") or base in ("_SUCCESS",):
                self.fs.rm(name)
            elif base == "_pipeline":
                self.fs.rm(name, recursive=True)
        self.fs.invalidate_cache(self.root)


def prepare_output(layout: OutputLayout, mode: str, fresh: bool, fingerprint: str) -> set[str]:
    """Apply the output mode; returns the ids of shards already committed (resume)."""
    if fresh or mode == "overwrite":
        layout.wipe()
        return set()
    previous = layout.read_job()
    if mode == "fail_if_exists" and (previous or layout.has_output()):
        raise OutputError(f"output.uri: {layout.uri} already holds output "
                          "(output.mode is fail_if_exists; use --fresh to replace it)")
    if previous is None:
        if layout.has_output():
            raise OutputError(f"output.uri: {layout.uri} holds part files but no "
                              "_pipeline/job.json; refusing to mix outputs (use --fresh)")
        return set()
    if previous.get("fingerprint") != fingerprint:
        raise OutputError(
            f"output.uri: {layout.uri} was written by a job with fingerprint "
            f"{str(previous.get('fingerprint'))[:12]}, this job is {fingerprint[:12]} "
            "(model or task changed); resume refused: use --fresh to start over"
        )
    layout.clear_success()
    return layout.committed_shards()

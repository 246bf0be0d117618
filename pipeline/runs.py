"""Runs of one output: ``_pipeline/runs/<run>.json``, one manifest per run.

A run is one pass that brings the output up to date with its input: the first run computes
everything; in incremental mode each later run computes new and changed files and retires
deleted ones. A manifest is written when the run starts (``running``, with what it plans),
again before its table commit (``committing``), and last when it is done (``complete``).
A run that did not complete is resumed, under the same id, by the next invocation.

Each manifest carries the ledger: every shard the output holds after the run, with the
pieces it was cut from, so the next run knows which shards a changed or deleted file touches
(markers name only their first pieces and redact URIs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.commit import OutputLayout
from pipeline.faults import maybe_inject
from pipeline.plan import Piece, Shard, Sizing, shard_id

FOLDER = "runs"
RUNNING, COMMITTING, COMPLETE = "running", "committing", "complete"
LISTED_FILES = 100  # a manifest names up to this many new, changed and deleted files


def manifest_name(run_id: int) -> str:
    return f"{FOLDER}/{run_id:06d}.json"


@dataclass
class RunLog:
    last: dict[str, Any] | None = None  # the newest manifest
    complete: dict[str, Any] | None = None  # the newest complete one

    @property
    def open(self) -> dict[str, Any] | None:
        """A run that started and did not complete: this invocation resumes it."""
        return self.last if self.last and self.last.get("status") != COMPLETE else None

    def next_id(self) -> int:
        if self.open:
            return int(self.open["run"])
        return int(self.complete["run"]) + 1 if self.complete else 1

    def ledger(self) -> dict[str, Shard]:
        """Shards named by the open run's plan and by the last complete run, by id."""
        shards: dict[str, Shard] = {}
        for manifest in (self.complete, self.open):
            for data in (manifest or {}).get("ledger", []):
                shards[data["id"]] = Shard.from_dict(data)
        return shards

    def sizing(self, rows_per_shard: int, bytes_per_shard: int | None) -> Sizing | None:
        """The first run's shard targets, while the job asks for the same sizes."""
        for manifest in (self.open, self.complete):
            saved = (manifest or {}).get("sizing")
            if saved and saved.get("rows_per_shard") == rows_per_shard \
                    and saved.get("asked_bytes_per_shard") == bytes_per_shard:
                return Sizing(saved["rows_per_shard"], dict(saved["bytes_per_shard"]))
        return None


def sizing_record(sizing: Sizing, bytes_per_shard: int | None) -> dict[str, Any]:
    return {"rows_per_shard": sizing.rows_per_shard, "asked_bytes_per_shard": bytes_per_shard,
            "bytes_per_shard": dict(sizing.bytes_per_shard)}


def read_runs(layout: OutputLayout) -> RunLog:
    """The newest manifest and the newest complete one (one listing, one or two reads)."""
    folder = layout.pipeline_path(FOLDER)
    layout.fs.invalidate_cache(folder)
    try:
        names = sorted(n.rsplit("/", 1)[-1] for n in layout.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return RunLog()
    ids = sorted((int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()),
                 reverse=True)
    log = RunLog()
    for run_id in ids:
        manifest = layout.read_json(manifest_name(run_id))
        if manifest is None:
            continue
        if log.last is None:
            log.last = manifest
        if manifest.get("status") == COMPLETE:
            log.complete = manifest
            break
    return log


def write_manifest(layout: OutputLayout, manifest: dict[str, Any]) -> None:
    manifest["updated_at"] = time.time()
    layout.write_json(manifest_name(int(manifest["run"])), manifest)


def public_view(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its ledger: what the report and the summary show."""
    return {k: v for k, v in manifest.items() if k != "ledger"}


def listed(uris: list[str]) -> dict[str, Any]:
    return {"count": len(uris), "first": uris[:LISTED_FILES]}


def start_run(layout: OutputLayout, log: RunLog, base: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the run this invocation makes (or resumes), written as ``running``."""
    manifest = dict(log.open or {"run": log.next_id(), "started_at": time.time()})
    if log.open:
        manifest["resumed"] = int(manifest.get("resumed", 0)) + 1
        # A crash after some dropped shards were deleted: they are gone from storage now,
        # but this run still replaced or retired them.
        live = {s["id"] for s in base.get("ledger", [])}
        base = {**base, "shards": _merged(log.open.get("shards", {}), base["shards"], live)}
    manifest.update(base, status=RUNNING)
    write_manifest(layout, manifest)
    return manifest


def _merged(before: dict[str, Any], now: dict[str, Any], live: set[str]) -> dict[str, Any]:
    """Shards the open run dropped before it died, and those it drops now; never a shard the
    output holds after the run."""
    out = dict(now)
    for key in ("replaced", "retired"):
        out[key] = sorted((set(before.get(key, [])) | set(now.get(key, []))) - live)
    out["retired"] = sorted(set(out["retired"]) - set(out["replaced"]))
    return out


def finish_run(layout: OutputLayout, sink: Any, manifest: dict[str, Any],
               commit: Any, dropped: list[str]) -> dict[str, Any]:
    """Every shard of the run is committed: publish the run in the sink (one table commit),
    uncommit the dropped shards, and mark the run complete. Each step can be repeated
    after a crash: the next invocation resumes the run and finds the same work done."""
    run_id = int(manifest["run"])
    manifest["status"] = COMMITTING
    write_manifest(layout, manifest)
    maybe_inject("driver.before_table_commit", "", run_id)
    manifest["table"] = {"format": sink.format, **sink.commit_run(layout, commit)}
    maybe_inject("driver.after_table_commit", "", run_id)
    remove_markers(layout, dropped)
    manifest["status"] = COMPLETE
    manifest["completed_at"] = time.time()
    write_manifest(layout, manifest)
    return manifest


def remove_markers(layout: OutputLayout, shard_ids: list[str]) -> None:
    """Uncommit dropped shards. Their part files and dead letters are then outside the plan:
    ``remove_orphans`` deletes them when the run ends (Parquet), or keeps the part files that
    older table versions read (Delta). A crash in between leaves orphans, never a marker
    without its rows."""
    if not shard_ids:
        return
    folder = layout.shards_folder()
    layout.fs.invalidate_cache(folder)
    present = {p.rsplit("/", 1)[-1] for p in layout.fs.ls(folder, detail=False)}
    doomed = [layout.marker_path(s) for s in shard_ids if f"{s}.json" in present]
    if doomed:  # one call: object stores delete in batches
        layout.fs.rm(doomed)
    layout.fs.invalidate_cache(folder)


def shards_from_markers(markers: dict[str, dict[str, Any]]) -> dict[str, Shard]:
    """Committed shards with their pieces, as their markers name them. A shard whose named
    pieces do not hash to its id (a marker names 32 pieces at most; a redacted URI) is left
    out: it is dropped, and its files are computed again."""
    shards = {}
    for sid, marker in markers.items():
        named = marker.get("pieces") or []
        pieces = tuple(Piece(uri, version, "", kind, start, end)
                       for uri, version, kind, start, end in named)
        if pieces and shard_id(pieces) == sid:
            shards[sid] = Shard(sid, pieces, marker.get("rows_in"), 0)
    return shards

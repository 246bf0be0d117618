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
import uuid
from dataclasses import dataclass

from pipeline.faults import maybe_inject
from pipeline.layout import OutputLayout
from pipeline.plan import Piece, Shard, Sizing, shard_id
from pipeline.sinks.base import RunCommit, Sink
from pipeline.state import FileList, RunManifest, ShardChanges, ShardMarker, SizingRecord

FOLDER = "runs"
RUNNING, COMMITTING, COMPLETE = "running", "committing", "complete"
LISTED_FILES = 100  # a manifest names up to this many new, changed and deleted files


def manifest_name(run_id: int) -> str:
    return f"{FOLDER}/{run_id:06d}.json"


@dataclass
class RunLog:
    last: RunManifest | None = None  # the newest manifest
    complete: RunManifest | None = None  # the newest complete one

    @property
    def open(self) -> RunManifest | None:
        """A run that started and did not complete: this invocation resumes it."""
        return self.last if self.last and self.last.status != COMPLETE else None

    def next_id(self) -> int:
        if self.open:
            return self.open.run
        return self.complete.run + 1 if self.complete else 1

    def ledger(self) -> dict[str, Shard]:
        """Shards named by the open run's plan and by the last complete run, by id."""
        shards: dict[str, Shard] = {}
        for manifest in (self.complete, self.open):
            for shard in manifest.ledger if manifest else []:
                shards[shard.id] = shard
        return shards

    def sizing(self, rows_per_shard: int, bytes_per_shard: int | None) -> Sizing | None:
        """The first run's shard targets, while the job asks for the same sizes."""
        for manifest in (self.open, self.complete):
            saved = manifest.sizing if manifest else None
            if saved and saved.rows_per_shard == rows_per_shard \
                    and saved.asked_bytes_per_shard == bytes_per_shard:
                return Sizing(saved.rows_per_shard, dict(saved.bytes_per_shard))
        return None


def sizing_record(sizing: Sizing, bytes_per_shard: int | None) -> SizingRecord:
    return SizingRecord(rows_per_shard=sizing.rows_per_shard,
                        asked_bytes_per_shard=bytes_per_shard,
                        bytes_per_shard=dict(sizing.bytes_per_shard))


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
        data = layout.read_json(manifest_name(run_id))
        if data is None:
            continue
        manifest = RunManifest.read(data, layout.pipeline_path(manifest_name(run_id)))
        if log.last is None:
            log.last = manifest
        if manifest.status == COMPLETE:
            log.complete = manifest
            break
    return log


def write_manifest(layout: OutputLayout, manifest: RunManifest) -> None:
    manifest.updated_at = time.time()
    layout.write_json(manifest_name(manifest.run), manifest.to_dict())


def listed(uris: list[str]) -> FileList:
    return FileList(count=len(uris), first=uris[:LISTED_FILES])


def start_run(layout: OutputLayout, log: RunLog, base: RunManifest) -> RunManifest:
    """The manifest of the run this invocation makes (or resumes), written as ``running``.
    ``base``: what this invocation plans (its ``run`` is replaced)."""
    if log.open:
        # The open run's manifest, with what this invocation plans over it (what it recorded
        # beyond that, a table commit before a crash say, stays). A crash after some dropped
        # shards were deleted: they are gone from storage now, but this run still replaced or
        # retired them.
        planned = {k: getattr(base, k) for k in base.model_fields_set
                   if k not in ("run", "started_at", "status") and getattr(base, k) is not None}
        shards = _merged(log.open.shards, base.shards, {s.id for s in base.ledger})
        manifest = log.open.model_copy(update={**planned, "shards": shards,
                                               "resumed": log.open.resumed + 1})
    else:
        manifest = base.model_copy(update={"run": log.next_id(), "started_at": time.time(),
                                           "token": uuid.uuid4().hex[:16]})
    manifest.status = RUNNING
    write_manifest(layout, manifest)
    return manifest


def _merged(before: ShardChanges, now: ShardChanges, live: set[str]) -> ShardChanges:
    """Shards the open run dropped before it died, and those it drops now; never a shard the
    output holds after the run."""
    replaced = sorted((set(before.replaced) | set(now.replaced)) - live)
    retired = sorted((set(before.retired) | set(now.retired)) - live - set(replaced))
    return now.model_copy(update={"replaced": replaced, "retired": retired})


def finish_run(layout: OutputLayout, sink: Sink, manifest: RunManifest, commit: RunCommit,
               dropped: list[str]) -> RunManifest:
    """Every shard of the run is committed: publish the run in the sink (one table commit),
    uncommit the dropped shards, and mark the run complete. Each step can be repeated
    after a crash: the next invocation resumes the run and finds the same work done."""
    manifest.status = COMMITTING
    write_manifest(layout, manifest)
    maybe_inject("driver.before_table_commit", "", manifest.run)
    manifest.table = {"format": sink.format, **sink.commit_run(layout, commit)}
    maybe_inject("driver.after_table_commit", "", manifest.run)
    remove_markers(layout, dropped)
    manifest.status = COMPLETE
    manifest.completed_at = time.time()
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


def shards_from_markers(markers: dict[str, ShardMarker]) -> dict[str, Shard]:
    """Committed shards with their pieces, as their markers name them. A shard whose named
    pieces do not hash to its id (a marker names 32 pieces at most; a redacted URI) is left
    out: it is dropped, and its files are computed again."""
    shards = {}
    for sid, marker in markers.items():
        pieces = tuple(Piece(uri, version, "", kind, start, end)
                       for uri, version, kind, start, end in marker.pieces)
        if pieces and shard_id(pieces) == sid:
            shards[sid] = Shard(sid, pieces, marker.rows_in, 0)
    return shards

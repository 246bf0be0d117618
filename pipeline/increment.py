"""Incremental planning: which shards a run keeps, computes, replaces and retires.

A pure function over plain records (no storage): the input files as listed now, the shard size
targets, and the shards the output holds (committed, with the pieces they were cut from).

- A held shard whose pieces all name files at the same version is kept: its rows stand.
- A file that is new, changed, or shared a shard with a changed file is cut into new shards
  (a split file is cut exactly as before, so the shards of it that a crashed run committed
  keep their ids and count as done).
- A held shard that names a changed file is replaced; one that names only deleted files (and
  files that are still there) is retired, or kept when the job keeps the rows of deleted
  files. A kept shard never overlaps a new one: each current file's rows are in exactly one
  set of shards after the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.listing import InputFile
from pipeline.plan import Shard, Sizing, cut_file, cut_shards


@dataclass
class Increment:
    shards: list[Shard]  # the output after this run: kept shards, then the ones to compute
    kept: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # held shards recomputed from new cuts
    retired: list[str] = field(default_factory=list)  # held shards whose input files are gone
    files_new: list[str] = field(default_factory=list)
    files_changed: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    files_unchanged: int = 0
    lost_with_deleted: list[str] = field(default_factory=list)  # see plan_increment

    def summary(self) -> dict[str, object]:
        return {"new": len(self.files_new), "changed": len(self.files_changed),
                "deleted": len(self.files_deleted), "unchanged": self.files_unchanged}


def plan_increment(files: list[InputFile], sizing: Sizing, held: list[Shard],
                   keep_deleted: bool = False) -> Increment:
    """``held``: the committed shards the output holds, with their pieces."""
    current = {f.uri: f.version for f in files}
    before = {p.uri: p.version for s in held for p in s.pieces}
    kept, stale = _still_valid(held, current, keep_deleted)
    # Kept shards must cover each file's rows at most once. Two cuts of one file can both be
    # held (rows_per_shard changed, then a run died before dropping the old cut): all of
    # them go stale and the file is cut again; shards of the new cut keep their ids.
    overlapping = _overlapping(kept)
    stale += [s for s in kept if s.id in overlapping]
    kept = [s for s in kept if s.id not in overlapping]
    kept_ids = {s.id for s in kept}
    whole = {(p.uri, p.version) for s in kept for p in s.pieces if p.kind == "file"}
    to_cut = [f for f in files if f.key not in whole and not _all_kept(f, sizing, kept_ids)]
    fresh = cut_shards(to_cut, sizing)
    fresh_ids = {s.id for s in fresh}
    recut = {f.key for f in to_cut}
    # A kept shard over a file that is cut again (a split file re-cut differently, e.g. after
    # rows_per_shard changed) would duplicate its rows: it is replaced by the new cut. Kept
    # shards the new cut reproduces (same id) are in ``fresh`` already and count as done.
    still: list[Shard] = []
    for shard in kept:
        if shard.id in fresh_ids:
            continue
        if any((p.uri, p.version) in recut for p in shard.pieces):
            stale.append(shard)
        else:
            still.append(shard)
    increment = Increment(shards=still + fresh, kept=[s.id for s in still])
    for shard in stale:
        if shard.id in fresh_ids:  # cut again the same way: committed, counts as done
            continue
        off = [p for p in shard.pieces if current.get(p.uri) != p.version]
        if not off or any(p.uri in current for p in off):
            increment.replaced.append(shard.id)  # a file changed, or the shard was re-cut
        else:
            increment.retired.append(shard.id)
        if keep_deleted:  # deleted files that shared a shard with a changed one: rows lost
            increment.lost_with_deleted += sorted({p.uri for p in shard.pieces
                                                   if p.uri not in current})
    _count_files(increment, files, before)
    return increment


def _still_valid(held: list[Shard], current: dict[str, str],
                 keep_deleted: bool) -> tuple[list[Shard], list[Shard]]:
    """Held shards whose files are all unchanged (or only deleted, when their rows are kept),
    and the stale rest."""
    kept: list[Shard] = []
    stale: list[Shard] = []
    for shard in held:
        off = [p for p in shard.pieces if current.get(p.uri) != p.version]
        if not off or (keep_deleted and all(p.uri not in current for p in off)):
            kept.append(shard)
        else:
            stale.append(shard)
    return kept, stale


def _count_files(increment: Increment, files: list[InputFile], before: dict[str, str]) -> None:
    """Input files new, changed, unchanged and deleted since the held shards were cut."""
    for f in files:
        if f.uri not in before:
            increment.files_new.append(f.uri)
        elif before[f.uri] != f.version:
            increment.files_changed.append(f.uri)
        else:
            increment.files_unchanged += 1
    increment.files_deleted = sorted(set(before) - {f.uri for f in files})


def _all_kept(file: InputFile, sizing: Sizing, kept_ids: set[str]) -> bool:
    """A split file whose every shard (cut as before) is held and kept."""
    cut = cut_file(file, sizing)
    return bool(cut) and all(s.id in kept_ids for s in cut)


def _overlapping(shards: list[Shard]) -> set[str]:
    """Ids of shards whose pieces cover rows of one file version that another shard covers."""
    by_file: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for shard in shards:
        for p in shard.pieces:
            span = (0, 1 << 62) if p.kind == "file" else (p.start, p.end)
            by_file.setdefault((p.uri, p.version), []).append((*span, shard.id))
    clash: set[str] = set()
    for spans in by_file.values():
        spans.sort()
        reach = -1  # the furthest row covered so far
        for start, end, _ in spans:
            if start < reach or (start == reach == end):  # an empty range counts too
                clash.update(sid for *_, sid in spans)  # the whole file is cut again
                break
            reach = max(reach, end)
    return clash

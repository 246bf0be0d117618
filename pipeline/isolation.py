"""Poison rows and memory blow-ups, isolated by splitting: a policy free of Ray and storage.

A row can kill the process that scores it (a segfault in a custom op or a provider, an abort
in a tokenizer, an illegal memory access on a GPU), or make it run out of memory; no Python
``except`` sees the first, and retrying the same shard only kills the next worker. So:

1. A shard in flight on a worker whose process died (not its node) is retried *alone*: on a
   worker with nothing else in flight, so that a second death names it for sure.
2. A shard that kills its worker when alone is cut in halves, each retried alone, and the
   half that still kills is halved again, down to single rows.
3. A single row that still kills its worker is dead-lettered with the reason, by a worker
   that reads the row without scoring it.

Memory is handled the same way, with smaller batches at every cut: a worker killed by Ray's
out-of-memory monitor, a ``MemoryError``, or onnxruntime failing to allocate for a single
row. A single row that still does not fit is dead-lettered as too large for this worker.

Deaths that cannot be a row's fault are not split: a node lost or preempted (its actors die
with it), a worker the driver stopped itself, and a burst of deaths (``BURST_DEATHS`` worker
processes within ``BURST_WINDOW_S``: a machine in trouble, not a row). Those are retried as
before, counting an attempt.

Every piece is a *sub-shard*: the rows ``[start, end)`` of its root shard's rows in reading
order, with an id of its own (``<root>-r<start>-<end>of<rows>``), its own part file and marker,
so exactly-once holds for the pieces. The cutting is bounded: a root shard gets at most
``retry.max_split_attempts`` extra attempts for all its pieces together; past that, the piece
fails as any shard does after its attempts.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from pipeline.plan import Shard

DeathKind = Literal["process", "memory", "node", "stopped", "other"]
# Worker processes dying within BURST_WINDOW_S of each other: not a row. Rows kill workers
# one at a time (each new worker must start and reach the row); a host in trouble kills
# several at once.
BURST_DEATHS = 3
BURST_WINDOW_S = 1.0
SUB_SHARD = re.compile(r"^(?P<root>.+)-r(?P<start>\d+)-(?P<end>\d+)of(?P<rows>\d+)$")

# How Ray words a death (ActorDiedError and its context), lower case.
NODE_WORDS = ("node has died", "node died", "nodediederror", "node was terminated",
              "preempted", "node is dead", "raylet")
# Not "OOM killer": Ray names it among the possible causes of every unexplained death.
MEMORY_WORDS = ("node_out_of_memory", "running low on memory", "memory monitor",
                "outofmemoryerror", "killed due to memory")
STOPPED_WORDS = ("ray.kill", "killed by `ray.kill`", "intended_user_exit", "exit_actor",
                 "no result within retry.shard_timeout_s")
PROCESS_WORDS = ("worker process has died", "worker unexpectedly exits", "exits unexpectedly",
                 "sigsegv", "sigabrt", "core dumped", "connection error code",
                 "actor died unexpectedly", "process died")


def death_kind(reason: str, preempted: bool = False) -> DeathKind:
    """What a worker's death says about its shards, from Ray's words."""
    text = reason.lower()
    if preempted or any(w in text for w in NODE_WORDS):
        return "node"
    if any(w in text for w in MEMORY_WORDS):
        return "memory"
    if any(w in text for w in STOPPED_WORDS):
        return "stopped"
    if any(w in text for w in PROCESS_WORDS):
        return "process"
    return "other"


def death_summary(reason: str) -> str:
    """A short cause for a dead letter: Ray's exit type and the first words of its detail."""
    kind = re.search(r"worker exit type: (\S+)", reason, re.IGNORECASE)
    detail = re.search(r"worker exit detail: ([^.]*)", reason, re.IGNORECASE)
    bits = [b.group(1).strip() for b in (kind, detail) if b]
    return ": ".join(bits)[:160] if bits else reason.split(".")[0][:160]


def root_of(shard_id: str) -> str:
    match = SUB_SHARD.match(shard_id)
    return match.group("root") if match else shard_id


def range_of(shard_id: str) -> tuple[int, int, int] | None:
    """(start, end, rows of the root) of a sub-shard id, None for a root shard."""
    match = SUB_SHARD.match(shard_id)
    if not match:
        return None
    return int(match["start"]), int(match["end"]), int(match["rows"])


def sub_shard(root: Shard, start: int, end: int, rows: int, batch_rows: int | None = None,
              dead_letter: str | None = None) -> Shard:
    """Rows ``[start, end)`` of ``root`` (which has ``rows`` rows) as a shard of its own."""
    return replace(root, id=f"{root.id}-r{start}-{end}of{rows}", rows=end - start,
                   bytes=root.bytes * (end - start) // max(1, rows), rows_range=(start, end),
                   batch_rows=batch_rows, dead_letter=dead_letter)


def halves(shard: Shard, root: Shard, rows: int, smaller_batches: bool) -> list[Shard]:
    start, end = shard.rows_range or (0, rows)
    middle = (start + end) // 2
    batch = None
    if smaller_batches:
        batch = max(1, (shard.batch_rows or 64) // 2)
    return [sub_shard(root, start, middle, rows, batch), sub_shard(root, middle, end, rows, batch)]


def root_shard(shard: Shard) -> Shard:
    """The root a sub-shard was cut from (the shard itself for a root)."""
    cut = range_of(shard.id)
    if cut is None:
        return shard
    return replace(shard, id=root_of(shard.id), rows=cut[2], rows_range=None, batch_rows=None,
                   dead_letter=None, bytes=shard.bytes * cut[2] // max(1, cut[1] - cut[0]))


def roots_done(roots: Iterable[str], committed: Iterable[str]) -> set[str]:
    """The root shards that are committed: by their own marker, or by markers of sub-shards
    that cover all their rows."""
    roots, ids = set(roots), set(committed)
    done = roots & ids
    ranges: dict[str, list[tuple[int, int, int]]] = {}
    for sid in ids:
        cut = range_of(sid)
        if cut is not None and root_of(sid) in roots:
            ranges.setdefault(root_of(sid), []).append(cut)
    for root, cuts in ranges.items():
        at = 0
        for start, end, _ in sorted(cuts):
            if start > at:
                break
            at = max(at, end)
        else:
            if at >= cuts[0][2]:
                done.add(root)
    return done


def remaining_pieces(root: Shard, committed: set[str]) -> list[Shard] | None:
    """The sub-shards still to run for ``root`` given committed shard ids: None when none of
    its pieces is committed (run it whole), [] when they cover it."""
    ranges = sorted(r for sid in committed if root_of(sid) == root.id and (r := range_of(sid)))
    if not ranges:
        return None
    rows = ranges[0][2]
    gaps, at = [], 0
    for start, end, _ in ranges:
        if start > at:
            gaps.append((at, start))
        at = max(at, end)
    if at < rows:
        gaps.append((at, rows))
    return [sub_shard(root, a, b, rows) for a, b in gaps]


@dataclass
class Verdict:
    """What to do with one shard after a death or an out-of-memory failure."""

    action: Literal["retry", "isolate", "split", "dead_letter", "fail"]
    pieces: list[Shard] = field(default_factory=list)  # split or dead_letter
    message: str = ""


class Isolation:
    """Which shards ran alone, how many extra attempts each root has used, recent deaths."""

    def __init__(self, shards: list[Shard], max_split_attempts: int) -> None:
        self.roots = {root_of(s.id): root_shard(s) for s in shards}
        self.max_split_attempts = max_split_attempts
        self.extra: dict[str, int] = {}  # root id -> extra attempts used
        self.deaths: deque[float] = deque()
        self.splits = 0  # shards cut
        self.isolated_rows: dict[str, str] = {}  # sub-shard id of a dead-lettered row -> why

    def is_burst(self, now: float) -> bool:
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > BURST_WINDOW_S:
            self.deaths.popleft()
        return len(self.deaths) >= BURST_DEATHS

    def after_death(self, shard: Shard, alone: bool, kind: DeathKind, reason: str,
                    rows: int | None) -> Verdict:
        """``shard`` was in flight on a worker whose process died (``kind``); ``alone``: it
        was the worker's only shard. ``rows``: the root's rows, when known."""
        if kind not in ("process", "memory"):
            return Verdict("retry")
        if not alone:
            return self._spend(shard, Verdict("isolate"))
        why = death_summary(reason)
        if kind == "memory":
            return self._cut(shard, rows, True, f"too large for this worker (killed for lack "
                                                f"of memory: {why})")
        return self._cut(shard, rows, False, f"worker process died on this row ({why})")

    def after_memory_error(self, shard: Shard, message: str, rows: int | None) -> Verdict:
        """The shard's call raised MemoryError or failed to allocate for a single row."""
        return self._cut(shard, rows, True, f"too large for this worker ({message[:200]})")

    def _cut(self, shard: Shard, rows: int | None, smaller_batches: bool, why: str) -> Verdict:
        root = self.roots[root_of(shard.id)]
        if rows is None:
            return Verdict("fail", message=f"{why}; its rows could not be counted to split it")
        start, end = shard.rows_range or (0, rows)
        if end - start <= 1:
            piece = sub_shard(root, start, end, rows, dead_letter=why)
            self.isolated_rows[piece.id] = why
            return self._spend(shard, Verdict("dead_letter", [piece]))
        self.splits += 1
        return self._spend(shard, Verdict("split", halves(shard, root, rows, smaller_batches)))

    def _spend(self, shard: Shard, verdict: Verdict) -> Verdict:
        root = root_of(shard.id)
        used = self.extra.get(root, 0) + 1
        self.extra[root] = used
        if used > self.max_split_attempts:
            return Verdict("fail", message=(
                f"shard {root}: gave up isolating the rows that kill its workers after "
                f"retry.max_split_attempts={self.max_split_attempts} extra attempts"))
        return verdict

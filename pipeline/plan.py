"""Planning: listing -> splitting and coalescing -> shards with stable ids.

A shard is one or more pieces of input files, about ``rows_per_shard`` rows or a byte target:

- a file smaller than the byte target is a whole-file piece, packed with its neighbours (in
  path order) into one shard, so 500 tiny files make a few shards, not 500;
- a larger Parquet file is cut by row groups, and a row group larger than a shard by row
  ranges, so every worker shares one huge file;
- a larger CSV or JSON Lines file is cut by byte ranges at line boundaries; an Arrow IPC file
  by record batches; a compressed file is read whole.

Only the footers of files that are split are read (and a sample for sizing), so planning
costs one listing plus a few reads, however many small files there are. Footers read by an
earlier run are reused from ``_pipeline/plan.json`` for files whose version did not change.
A shard id is a hash of its pieces (file, version, range): the same input always gives the
same shards, and a changed file never resumes into old output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import storage
from pipeline.arrow_types import check_unifiable, decode_schema
from pipeline.errors import InputError, OutputError
from pipeline.listing import GLOB_CHARS, InputFile, inspect, list_input_files, read_schemas

FALLBACK_BYTES_PER_ROW = 1024.0
# Inputs of up to this many files have every file's schema read at planning, so that column
# types that cannot be unified stop the job before it runs; larger ones are checked on the
# files planning reads anyway (samples, split files), the rest by the shards reading them.
SCHEMA_CHECK_FILES = 256
PLAN_VERSION = 2


@dataclass(frozen=True)
class Piece:
    uri: str
    version: str
    format: str
    kind: str = "file"  # file | rows (Parquet) | bytes (CSV, JSONL) | batches (Arrow IPC)
    start: int = 0
    end: int = 0  # [start, end) in rows, bytes or batches; unused for "file"
    # How a worker reads a table's data file (``pipeline.sources``): the table version to
    # open, deletes to apply, partition values. Not identity: ``version`` holds the deletes.
    read: str | None = None

    def key(self) -> list[Any]:
        return [self.uri, self.version, self.kind, self.start, self.end]


@dataclass(frozen=True)
class Shard:
    id: str
    pieces: tuple[Piece, ...]
    rows: int | None  # known when footers were read; None otherwise
    bytes: int
    error: str | None = None  # set when a file could not even be planned (corrupt footer)
    # A sub-shard (pipeline.isolation): rows [start, end) of its root's rows in reading order,
    # smaller model batches, or rows to dead-letter unread by the model, with the reason.
    rows_range: tuple[int, int] | None = None
    batch_rows: int | None = None
    dead_letter: str | None = None

    @property
    def uri(self) -> str:
        """The input, for messages: the file, or the first file and how many more."""
        more = len({p.uri for p in self.pieces}) - 1
        return self.pieces[0].uri + (f" (+{more} more files)" if more > 0 else "")

    @property
    def format(self) -> str:
        return self.pieces[0].format

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        pieces = tuple(Piece(**p) for p in data["pieces"])
        rows_range = tuple(data["rows_range"]) if data.get("rows_range") else None
        return cls(**{**data, "pieces": pieces, "rows_range": rows_range})


def shard_id(pieces: tuple[Piece, ...]) -> str:
    key = json.dumps([p.key() for p in pieces])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def make_shard(pieces: list[Piece], rows: int | None, size: int, error: str | None = None) -> Shard:
    return Shard(shard_id(tuple(pieces)), tuple(pieces), rows, size, error)


@dataclass
class Sizing:
    rows_per_shard: int
    bytes_per_shard: dict[str, int] = field(default_factory=dict)  # by format

    def target_bytes(self, fmt: str) -> int:
        return self.bytes_per_shard.get(fmt) or int(self.rows_per_shard * FALLBACK_BYTES_PER_ROW)


@dataclass
class Plan:
    shards: list[Shard]
    files: list[InputFile]
    read_columns: list[str]
    sizing: Sizing | None = None

    @property
    def total_rows(self) -> int | None:
        if any(s.rows is None for s in self.shards):
            return None
        return sum(s.rows or 0 for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def document(self) -> dict[str, Any]:
        """What ``_pipeline/plan.json`` holds: files with their footers, for the next run."""
        inspected = [f.to_dict() for f in self.files if f.columns is not None and not f.error]
        return {"plan_version": PLAN_VERSION, "files": inspected, "shards": len(self.shards)}


# ----------------------------------------------------------------------------- splitting


def cut_file(file: InputFile, sizing: Sizing) -> list[Shard] | None:
    """Shards of a file too big to share one, or None for a file to coalesce with others."""
    target = sizing.target_bytes(file.format)
    whole = Piece(file.uri, file.version, file.format, read=file.read)
    if file.error:
        return [make_shard([whole], None, file.size, error=file.error)]
    if file.format in ("parquet", "lance") and file.row_group_rows is not None:
        if not file.row_group_rows or sum(file.row_group_rows) == 0:  # empty: still one shard
            return [make_shard([Piece(file.uri, file.version, file.format, "rows", 0, 0,
                                      read=file.read)], 0, file.size)]
        if file.size <= target and sum(file.row_group_rows) <= sizing.rows_per_shard:
            return None
        return _cut_rows(file, sizing.rows_per_shard)
    if file.size <= target or file.compressed:
        return None if file.size <= target else [make_shard([whole], None, file.size)]
    if file.format in ("csv", "jsonl"):
        return _cut_bytes(file, target)
    if file.format == "ipc" and file.num_batches and file.num_batches > 1:
        per = max(1, round(file.num_batches * target / file.size))
        return [make_shard([Piece(file.uri, file.version, "ipc", "batches", a,
                                  min(a + per, file.num_batches), read=file.read)],
                           None, int(file.size * min(per, file.num_batches - a) / file.num_batches))
                for a in range(0, file.num_batches, per)]
    return [make_shard([whole], None, file.size)]


def _cut_rows(file: InputFile, rows_per_shard: int) -> list[Shard]:
    """Whole row groups up to ``rows_per_shard``; a bigger row group in equal row ranges."""
    groups = file.row_group_rows or []
    total = sum(groups)
    ranges: list[tuple[int, int]] = []
    start = offset = 0
    for n in groups:
        if n > rows_per_shard:
            if offset > start:
                ranges.append((start, offset))
            parts = math.ceil(n / rows_per_shard)
            bounds = [offset + (n * k) // parts for k in range(parts + 1)]
            ranges += list(itertools.pairwise(bounds))
            start = offset + n
        elif offset + n - start >= rows_per_shard:
            ranges.append((start, offset + n))
            start = offset + n
        offset += n
    if offset > start:
        ranges.append((start, offset))
    return [make_shard([Piece(file.uri, file.version, file.format, "rows", a, b, read=file.read)],
                       b - a, int(file.size * (b - a) / total)) for a, b in ranges]


def _cut_bytes(file: InputFile, target: int) -> list[Shard]:
    """Byte ranges: a reader takes the lines that start inside its range (see formats)."""
    parts = max(1, math.ceil(file.size / target))
    bounds = [(file.size * k) // parts for k in range(parts + 1)]
    return [make_shard([Piece(file.uri, file.version, file.format, "bytes", a, b, read=file.read)],
                       None, b - a)
            for a, b in itertools.pairwise(bounds)]


def coalesce(files: list[InputFile], sizing: Sizing) -> list[Shard]:
    """Small files packed in path order into shards of about the byte target."""
    shards: list[Shard] = []
    group: list[InputFile] = []
    size = 0
    for file in files:
        group.append(file)
        size += file.size
        # An image file is one row: rows_per_shard caps a shard of them as well as its bytes.
        images = file.format == "images" and len(group) >= sizing.rows_per_shard
        if images or size >= sizing.target_bytes(file.format):
            shards.append(_group_shard(group))
            group, size = [], 0
    if group:
        shards.append(_group_shard(group))
    return shards


def _group_shard(group: list[InputFile]) -> Shard:
    pieces = [Piece(f.uri, f.version, f.format, read=f.read) for f in group]
    known = [1 if f.format == "images" else sum(f.row_group_rows) for f in group
             if f.format == "images" or f.row_group_rows is not None]
    rows = sum(known) if len(known) == len(group) else None
    return make_shard(pieces, rows, sum(f.size for f in group))


def cut_shards(files: list[InputFile], sizing: Sizing) -> list[Shard]:
    """Every file in path order: split ones give their shards, small ones are coalesced."""
    shards: list[Shard] = []
    small: list[InputFile] = []
    for file in files:
        cut = cut_file(file, sizing)
        if cut is None:
            small.append(file)
            continue
        shards += cut
    return shards + coalesce(small, sizing)


# ----------------------------------------------------------------------------- sizing


def measure_sizing(files: list[InputFile], rows_per_shard: int,
                   bytes_per_shard: int | None) -> Sizing:
    """Byte targets per format: ``bytes_per_shard``, or rows_per_shard x the bytes per row of
    the first file of that format. Only that sample counts, never footers that happen to be
    known (from plan.json), so the same input always gets the same targets and shards."""
    sizing = Sizing(rows_per_shard)
    for sample in _samples(files):
        per_row = sample.bytes_per_row or FALLBACK_BYTES_PER_ROW
        if sample.format == "images":  # a row is a file: one file's size is no sample of them
            per_row = _mean_size([f for f in files if f.format == "images"])
        sizing.bytes_per_shard[sample.format] = bytes_per_shard or max(1, int(rows_per_shard
                                                                              * per_row))
    return sizing


def _mean_size(files: list[InputFile]) -> float:
    return max(1.0, sum(f.size for f in files) / max(1, len(files)))


def _samples(files: list[InputFile]) -> list[InputFile]:
    """The first file of each format: its columns are checked and its rows sized."""
    first: dict[str, InputFile] = {}
    for f in files:
        if f.size > 0 or f.format in ("parquet", "ipc"):  # an empty text file tells nothing
            first.setdefault(f.format, f)
    return list(first.values())


def _needs_footer(file: InputFile, sizing: Sizing) -> bool:
    if file.row_group_rows is not None or file.num_batches is not None or file.compressed:
        return False
    return file.format in ("parquet", "ipc") and file.size > sizing.target_bytes(file.format)


def check_columns(files: list[InputFile], needed: list[str],
                  unified: list[str] | None = None) -> None:
    """Files whose columns are known (footers read); the others are checked by the workers.
    ``unified``: columns written as they are read (passthrough), whose types across files
    must unify (a task's input column of a wrong type is the task's: its rows are
    dead-lettered with the type named)."""
    for f in files:
        if f.error or f.columns is None:
            continue
        missing = [c for c in needed if c not in f.columns]
        if missing:
            raise InputError(
                f"{f.uri}: column {missing[0]!r} is missing (has: {', '.join(f.columns[:15])})"
            )
    check_unifiable([(f.uri, decode_schema(f.schema)) for f in files
                     if f.schema is not None and not f.error],
                    needed if unified is None else unified)


def make_plan(
    uri: str,
    fmt: str | None,
    storage_options: dict[str, Any],
    rows_per_shard: int,
    needed_columns: list[str],
    bytes_per_shard: int | None = None,
    known: dict[tuple[str, str], InputFile] | None = None,
    listed: list[InputFile] | None = None,
    unified: list[str] | None = None,
) -> Plan:
    """List (or take the ``listed`` files of a source), read the footers that splitting needs
    (reusing ``known`` ones), cut shards."""
    files, sizing = survey(uri, fmt, storage_options, rows_per_shard, needed_columns,
                           bytes_per_shard, known, listed=listed, unified=unified)
    return Plan(cut_shards(files, sizing), files, needed_columns, sizing)


def survey(
    uri: str,
    fmt: str | None,
    storage_options: dict[str, Any],
    rows_per_shard: int,
    needed_columns: list[str],
    bytes_per_shard: int | None = None,
    known: dict[tuple[str, str], InputFile] | None = None,
    sizing: Sizing | None = None,
    listed: list[InputFile] | None = None,
    unified: list[str] | None = None,
) -> tuple[list[InputFile], Sizing]:
    """The input files with the footers that splitting needs, and the shard size targets
    (``sizing`` when given: an incremental output keeps the targets of its first run).
    ``listed``: the files a source listed (a table version's data files); else a listing."""
    files = list(listed) if listed is not None else list_input_files(uri, fmt, storage_options)
    known = known or {}
    for i, f in enumerate(files):
        cached = known.get(f.key)
        if cached is not None and cached.format == f.format and cached.error is None:
            files[i] = InputFile.from_dict({**cached.to_dict(), "read": f.read})
    inspect([f for f in _samples(files) if f.columns is None], storage_options, sample=True)
    measured = measure_sizing(files, rows_per_shard, bytes_per_shard)
    if sizing is None:
        sizing = measured
    else:  # kept targets; a format the input did not have before gets its own
        for fmt, target in measured.bytes_per_shard.items():
            sizing.bytes_per_shard.setdefault(fmt, target)
    inspect([f for f in files if _needs_footer(f, sizing)], storage_options)
    if len(files) <= SCHEMA_CHECK_FILES:
        read_schemas(files, storage_options)
    check_columns(files, needed_columns, unified)
    return files, sizing


def known_files(document: dict[str, Any] | None) -> dict[tuple[str, str], InputFile]:
    """Footers from an earlier run's plan.json, by (uri, version)."""
    if not document or document.get("plan_version") != PLAN_VERSION:
        return {}
    files = [InputFile.from_dict(f) for f in document.get("files", [])]
    return {f.key: f for f in files}


def check_output_not_input(output_uri: str, files: list[InputFile], storage_options,
                           input_uri: str, input_options) -> None:
    fs, out_path = storage.filesystem(output_uri, storage_options)
    out = storage.full_uri(fs, out_path).rstrip("/") + "/"
    in_fs, in_path = storage.filesystem(input_uri, input_options)
    if not any(c in in_path for c in GLOB_CHARS):
        inp = storage.full_uri(in_fs, in_path).rstrip("/") + "/"
        if out.startswith(inp) and out != inp:
            raise OutputError(f"output.uri: {output_uri} is inside input.uri {input_uri}; "
                              "a rerun would read the output as input")
    for f in files:
        if f.uri.startswith(out) or f.uri.rstrip("/") + "/" == out:
            raise OutputError(f"output.uri: {output_uri} contains input file {f.uri}; "
                              "writing there would overwrite the input")

"""Planning: list input files, read Parquet footers in parallel, cut shards with stable ids.

The plan is a plain serializable object; the runner executes it. A shard id is a hash of
(file path, etag or size, row-group range), so the same input always gives the same shards
and a rerun finds the markers of the shards it already committed.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError, OutputError
from pipeline.formats import format_of, read_schema

FOOTER_THREADS = 16
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Shard:
    id: str
    uri: str  # full URI of the input file
    format: str
    row_groups: tuple[int, int] | None  # [start, end) for Parquet, None for a whole file
    rows: int | None  # known for Parquet, None when the format does not tell before reading
    bytes: int
    error: str | None = None  # set when the file could not even be planned (corrupt footer)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        rg = data.get("row_groups")
        return cls(**{**data, "row_groups": tuple(rg) if rg else None})


@dataclass
class InputFile:
    uri: str
    format: str
    size: int
    version: str  # etag when the store has one, else the size
    row_group_rows: list[int] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Plan:
    shards: list[Shard]
    files: list[InputFile]
    read_columns: list[str]

    @property
    def total_rows(self) -> int | None:
        if any(s.rows is None for s in self.shards):
            return None
        return sum(s.rows or 0 for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def shard_id(uri: str, version: str, row_groups: tuple[int, int] | None) -> str:
    key = json.dumps([uri, version, list(row_groups) if row_groups else None])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def list_input_files(uri: str, fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    return storage.with_retries(lambda: _list_input_files(uri, fmt, storage_options),
                                f"listing {uri}")


def _list_input_files(uri: str, fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    try:
        fs, path = storage.filesystem(uri, storage_options)
        if any(c in path for c in GLOB_CHARS):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(fs.find(path))
        elif fs.exists(path):
            paths = [path]
        else:
            raise InputError(f"input.uri: {uri} does not exist")
        infos = [fs.info(p) for p in paths]
    except InputError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        # TypeError: storage_options the filesystem does not accept.
        raise InputError(f"input: cannot list {uri} ({type(exc).__name__}: {exc})") from None
    files = []
    root = path.rstrip("/") + "/"
    for info in infos:
        p = info["name"]
        relative = p[len(root):] if p.startswith(root) else p.rstrip("/").rsplit("/", 1)[-1]
        # _SUCCESS, _pipeline/ (markers, dead letters), .tmp files: never input, at any depth.
        if info.get("type") == "directory" or any(part.startswith(("_", "."))
                                                  for part in relative.split("/")):
            continue
        file_fmt = format_of(p, fmt) if fmt is None else (format_of(p, None) or fmt)
        if fmt is not None and file_fmt != fmt:
            continue
        if file_fmt is None:
            continue
        etag = info.get("ETag") or info.get("etag")
        version = str(etag).strip('"') if etag else f"size={info.get('size', 0)}"
        files.append(InputFile(storage.full_uri(fs, p), file_fmt, int(info.get("size") or 0),
                               version))
    if not files:
        raise InputError(f"input.uri: no {fmt or 'parquet/ipc/csv/jsonl'} files under {uri}")
    return files


def _inspect(file: InputFile, storage_options: dict[str, Any]) -> InputFile:
    fs, path = storage.filesystem(file.uri, storage_options)

    def read() -> None:
        if file.format == "parquet":
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                file.row_group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
                file.columns = list(meta.schema.to_arrow_schema().names)
        else:
            file.columns = list(read_schema(fs, path, file.format).names)

    try:
        # Throttling and resets are retried; what still fails marks the file, not the job.
        storage.with_retries(read, f"reading {file.uri}")
    except FileNotFoundError:
        file.error = "file disappeared while planning"
    except Exception as exc:  # corrupt or truncated files raise many arrow/OS error types
        file.error = f"unreadable {file.format} file: {' '.join(str(exc).split())[:200]}"
    return file


def cut_shards(file: InputFile, rows_per_shard: int) -> list[Shard]:
    if file.error:
        return [Shard(shard_id(file.uri, file.version, None), file.uri, file.format, None, None,
                      file.size, error=file.error)]
    if file.format != "parquet":
        return [Shard(shard_id(file.uri, file.version, None), file.uri, file.format, None, None,
                      file.size)]
    groups = file.row_group_rows
    if not groups:  # an empty Parquet file still gets a shard, so it shows as done
        return [Shard(shard_id(file.uri, file.version, (0, 0)), file.uri, "parquet", (0, 0), 0, 0)]
    shards, start, rows = [], 0, 0
    total = sum(groups) or 1
    for i, n in enumerate(groups):
        rows += n
        if rows >= rows_per_shard or i == len(groups) - 1:
            rg = (start, i + 1)
            size = int(file.size * rows / total)
            shards.append(Shard(shard_id(file.uri, file.version, rg), file.uri, "parquet", rg,
                                rows, size))
            start, rows = i + 1, 0
    return shards


def check_columns(files: list[InputFile], needed: list[str]) -> None:
    for f in files:
        if f.error:
            continue
        missing = [c for c in needed if c not in f.columns]
        if missing:
            raise InputError(
                f"{f.uri}: column {missing[0]!r} is missing (has: {', '.join(f.columns[:15])})"
            )


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


def make_plan(
    uri: str,
    fmt: str | None,
    storage_options: dict[str, Any],
    rows_per_shard: int,
    needed_columns: list[str],
) -> Plan:
    files = list_input_files(uri, fmt, storage_options)
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        files = list(pool.map(lambda f: _inspect(f, storage_options), files))
    check_columns(files, needed_columns)
    shards = [s for f in files for s in cut_shards(f, rows_per_shard)]
    return Plan(shards=shards, files=files, read_columns=needed_columns)

"""Listing the input: one paginated listing gives every file's path, size and version.

A file's version is what identifies its content without reading it: the etag (and version id)
on object stores, size and modification time on local disks, so a file replaced by another of
the same size is noticed. Footers are read only for the files that need them, in parallel with
bounded concurrency (``inspect``), never one request per file just to learn its size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.arrow_types import encode_schema
from pipeline.errors import InputError, access_error, one_line, storage_error
from pipeline.formats import IMAGE_SCHEMA, format_of, read_schema
from pipeline.redaction import scrub

FOOTER_THREADS = 16
GLOB_CHARS = "*?["
SAMPLE_BYTES = 1 << 20


@dataclass
class InputFile:
    uri: str
    format: str
    size: int
    version: str  # etag (+ version id) on object stores, size and mtime on local disks
    row_group_rows: list[int] | None = None  # Parquet, once its footer is read
    num_batches: int | None = None  # Arrow IPC file format, once its footer is read
    columns: list[str] | None = None  # once a footer or a first block is read
    bytes_per_row: float | None = None  # measured on a sample, for sizing shards
    schema: str | None = None  # its Arrow schema (arrow_types.encode_schema), once read
    read: str | None = None  # a table's data file: how workers read it (pipeline.sources)
    error: str | None = None

    @property
    def compressed(self) -> bool:
        return self.uri.endswith(".gz")

    @property
    def key(self) -> tuple[str, str]:
        return (self.uri, self.version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputFile:
        return cls(**data)


def _version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        version_id = info.get("VersionId") or info.get("version_id")
        return str(etag).strip('"') + (f"@{version_id}" if version_id else "")
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated")
    mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else mtime
    return f"size={int(info.get('size') or 0)},mtime={float(mtime or 0):.6f}"


def _ignored(relative: str) -> bool:
    # _SUCCESS, _pipeline/ (markers, dead letters), .tmp files: never input, at any depth.
    return any(part.startswith(("_", ".")) for part in relative.split("/"))


def list_input_files(uri: str, fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    return storage.with_retries(lambda: _list(uri, fmt, storage_options), f"listing {uri}")


def _list(uri: str, fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    try:
        fs, path = storage.filesystem(uri, storage_options)
        if any(c in path for c in GLOB_CHARS):
            infos = fs.glob(path, detail=True)
            if not infos:
                storage.check_bucket(fs, path)
        else:  # no isdir() first: on object stores it lists everything too
            infos = _find(fs, path)
            if not infos and fs.exists(path):
                infos = {path: fs.info(path)}
            if not infos:
                storage.check_bucket(fs, path)  # a missing bucket reads as a missing path
                raise InputError(f"input.uri: {uri} does not exist")
            # find() on a single file may give it without details.
            infos = {name: info if info else fs.info(name) for name, info in infos.items()}
    except InputError:
        raise
    except Exception as exc:
        # No credentials, access denied, no bucket: exit 2, one line; so are OS errors and
        # storage_options the filesystem does not accept (TypeError). Anything else is a bug.
        if access_error(exc, "input.uri", uri) is None and \
                not isinstance(exc, (OSError, ValueError, TypeError)):
            raise
        raise storage_error(exc, "input.uri", uri, "list", storage_options) from exc
    root = path.rstrip("/") + "/"
    files = []
    for name in sorted(infos):
        info = infos[name]
        relative = name[len(root):] if name.startswith(root) else name.rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "directory" or _ignored(relative):
            continue
        file_fmt = format_of(name, fmt) if fmt in (None, "images") else \
            (format_of(name, None) or fmt)
        if file_fmt is None or (fmt is not None and file_fmt != fmt):
            continue
        files.append(InputFile(storage.full_uri(fs, name), file_fmt, int(info.get("size") or 0),
                               _version(info)))
    if not files:
        what = "image" if fmt == "images" else fmt or "parquet/ipc/csv/jsonl"
        raise InputError(f"input.uri: no {what} files under {uri}")
    return files


def _find(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """Every file below ``path``. The top level is listed once; its folders (partitions such
    as ``date=.../``) are listed in parallel, skipping ``_``/``.`` folders (job bookkeeping)."""
    try:
        top = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {e["name"]: e for e in top if e.get("type") != "directory"}
    folders = [e["name"] for e in top if e.get("type") == "directory"
               and not _ignored(e["name"].rstrip("/").rsplit("/", 1)[-1])
               and e["name"].rstrip("/") != path.rstrip("/")]
    if folders:
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(folders))) as pool:
            for infos in pool.map(lambda folder: fs.find(folder, detail=True), folders):
                found.update(infos)
    return found


def inspect(files: list[InputFile], storage_options: dict[str, Any], sample: bool = False) -> None:
    """Read footers (Parquet row groups, IPC batch counts) and columns, in parallel; with
    ``sample``, also measure bytes per row. A file that cannot be read is marked, not raised."""
    if not files:
        return
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        list(pool.map(lambda f: _inspect(f, storage_options, sample), files))


def _inspect(file: InputFile, storage_options: dict[str, Any], sample: bool) -> None:
    fs, path = storage.filesystem(file.uri, storage_options)

    def read() -> None:
        if file.format == "parquet":
            with fs.open(path, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
            file.row_group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            if file.read is None:  # a table's data file has the table's columns already
                arrow = meta.schema.to_arrow_schema()
                file.columns, file.schema = list(arrow.names), encode_schema(arrow)
            rows = sum(file.row_group_rows)
            file.bytes_per_row = file.size / rows if rows else None
        elif file.format == "images":  # one row each; decoding is the task's, not planning's
            file.columns = list(IMAGE_SCHEMA.names)
            file.bytes_per_row = float(file.size) or None
        elif file.format == "ipc" and not file.compressed:
            with fs.open(path, "rb") as fh:
                _inspect_ipc(file, fh)
        else:
            schema = read_schema(fs, path, file.format)
            file.columns, file.schema = list(schema.names), encode_schema(schema)
            if sample:
                file.bytes_per_row = _text_bytes_per_row(fs, path, file)

    try:
        # Throttling and resets are retried; what still fails marks the file, not the job.
        storage.with_retries(read, f"reading {file.uri}")
    except Exception as exc:  # corrupt or truncated files raise many arrow/OS error types
        access = access_error(exc, "input.uri", file.uri)
        if access is not None:  # listing was allowed but reading is not: stop the job
            raise access from exc
        if isinstance(exc, FileNotFoundError):
            file.error = "file disappeared while planning"
        else:
            text = one_line(scrub(str(exc), storage_options), 200)
            file.error = f"unreadable {file.format} file: {text}"


def read_schemas(files: list[InputFile], storage_options: dict[str, Any]) -> None:
    """The Arrow schema of each file not read yet, in parallel (a Parquet footer, an IPC
    header, a first block), so that planning sees every file's column types; a file that
    cannot be read is left to its shard, which reports it."""
    todo = [f for f in files if f.schema is None and not f.error and f.format != "images"]

    def read(file: InputFile) -> None:
        fs, path = storage.filesystem(file.uri, storage_options)
        try:
            schema = read_schema(fs, path, file.format)
        except Exception:  # the shard reading this file reports what is wrong
            return
        file.columns, file.schema = list(schema.names), encode_schema(schema)

    if todo:
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(todo))) as pool:
            list(pool.map(read, todo))


def _inspect_ipc(file: InputFile, fh: Any) -> None:
    try:
        reader = ipc.open_file(fh)
    except pa.ArrowInvalid:  # the stream format has no footer: read as a whole
        fh.seek(0)
        schema = ipc.open_stream(fh).schema
        file.columns, file.schema = list(schema.names), encode_schema(schema)
        file.num_batches = None
        return
    file.columns, file.schema = list(reader.schema.names), encode_schema(reader.schema)
    file.num_batches = reader.num_record_batches
    if file.num_batches:
        first = reader.get_batch(0).num_rows
        rows = first * file.num_batches
        file.bytes_per_row = file.size / rows if rows else None


def _text_bytes_per_row(fs: Any, path: str, file: InputFile) -> float | None:
    """Bytes per line of the first block (compressed files: unknown, they are read whole)."""
    if file.compressed:
        return None
    with fs.open(path, "rb") as fh:
        head = fh.read(SAMPLE_BYTES)
    lines = head.count(b"\n")
    return len(head) / lines if lines else None


__all__ = ["InputFile", "inspect", "list_input_files", "read_schemas"]

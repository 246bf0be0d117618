"""Loose files as a source: a folder, a file or a glob, listed (``pipeline.listing``).

A table's folder holds files that are no longer in the table (removed by deletes, updates and
compaction, until a vacuum), so reading it as loose files scores dead rows and live ones
twice. A file job whose ``input.uri`` is a Delta, Iceberg or Lance table, or lies inside one,
is refused in one line naming the format and the key to set.
"""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.errors import InputError
from pipeline.listing import GLOB_CHARS, InputFile, list_input_files

# What marks a table's root: a folder (or file pattern) only that format keeps there.
MARKERS = (("delta", "_delta_log"), ("lance", "_versions"), ("iceberg", "metadata"))
MAX_PARENTS = 8  # how far up "inside a table" is looked for


def list_files(uri: str, fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    return list_input_files(uri, fmt, storage_options)


def check_not_a_table(uri: str, storage_options: dict[str, Any]) -> None:
    try:
        fs, path = storage.filesystem(uri, storage_options)
    except Exception:  # the listing reports bad options and URIs in its own words
        return
    cut = min([path.find(c) for c in GLOB_CHARS if c in path] or [len(path)])
    folder = path[:cut].rstrip("/")
    if cut < len(path):  # a glob: its fixed folder
        folder = folder.rsplit("/", 1)[0] if "/" in folder else folder
    found = table_at(fs, folder)
    if found is None:
        return
    fmt, root = found
    where = "is" if root.rstrip("/") == folder else f"is inside {storage.full_uri(fs, root)}, which is"
    raise InputError(f"input.uri: {uri} {where} a {fmt.title()} table; its folder holds files "
                     f"that are no longer in the table: set input.format: {fmt} to read the "
                     "table at one version")


def table_at(fs: Any, path: str) -> tuple[str, str] | None:
    """(format, root) of the table at ``path`` or above it, or None."""
    candidate = path.rstrip("/")
    for _ in range(MAX_PARENTS):
        if not candidate or candidate in ("/", "."):
            return None
        fmt = _marked(fs, candidate)
        if fmt is not None:
            return fmt, candidate
        if "/" not in candidate.strip("/"):
            return None
        candidate = candidate.rsplit("/", 1)[0]
    return None


def _marked(fs: Any, folder: str) -> str | None:
    for fmt, marker in MARKERS:
        try:
            if not fs.isdir(f"{folder}/{marker}"):
                continue
            if fmt == "iceberg" and not fs.glob(f"{folder}/metadata/*.metadata.json"):
                continue
        except Exception:  # unreadable parents (other buckets, permissions): not a table
            continue
        return fmt
    return None

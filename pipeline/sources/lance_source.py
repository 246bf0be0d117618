"""Lance input through ``lance``: the fragments of one dataset version.

Each fragment is one input file (``<root>#fragment=<id>``, format ``lance``) whose rows are
its live rows: a fragment bigger than a shard is cut into ranges of live rows, small ones are
packed together. Its identity is its data files, physical rows and deletion file, so a
delete in a fragment changes the shards cut from it. Workers open the dataset at the version
read and read each fragment with its deletion file applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import pyarrow as pa

from pipeline.arrow_types import encode_schema, plain_schema
from pipeline.errors import InputError, cause_text
from pipeline.listing import InputFile
from pipeline.sinks.object_store import object_store_options, table_path
from pipeline.sources.base import Listing, TableVersion, deletes_id, read_info
from pipeline.spec import InputSpec

FRAGMENT = "#fragment="


def open_dataset(uri: str, storage_options: dict[str, Any], version: int | None) -> Any:
    import lance

    options = object_store_options(uri, storage_options)
    try:
        dataset = lance.dataset(table_path(uri), storage_options=options or None)
    except Exception as exc:
        raise InputError(f"input.uri: cannot open Lance dataset {uri} "
                         f"({cause_text(exc, storage_options)})") from exc
    if version is None or version == dataset.version:
        return dataset
    try:
        return lance.dataset(table_path(uri), version=version, storage_options=options or None)
    except Exception as exc:
        raise InputError(f"input.version: Lance dataset {uri} has no version {version} "
                         f"(latest {dataset.version}; older ones may be cleaned up)") from exc


def list_lance(spec: InputSpec, version: int | None) -> Listing:
    uri = str(spec.uri).rstrip("/")
    dataset = open_dataset(uri, spec.storage_options, version)
    schema = plain_schema(dataset.schema)
    encoded = encode_schema(schema)
    files = []
    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        data = [{"path": f.path, "size": getattr(f, "file_size_bytes", None)} for f in meta.files]
        deletion = meta.deletion_file
        removed = None if deletion is None else (deletion.id, deletion.read_version,
                                                 deletion.num_deleted_rows)
        live = meta.physical_rows - (deletion.num_deleted_rows if deletion is not None else 0)
        size = sum(f["size"] or 0 for f in data)
        identity = f"rows={meta.physical_rows},files={deletes_id(data)}"
        if removed is not None:
            identity += f",del={deletes_id(removed)}"
        files.append(InputFile(
            uri=f"{uri}{FRAGMENT}{fragment.fragment_id}", format="lance", size=size,
            version=identity, row_group_rows=[live], columns=list(schema.names), schema=encoded,
            bytes_per_row=size / live if live else None,
            read=read_info(source="lance", table=uri, version=dataset.version,
                           fragment=fragment.fragment_id)))
    return Listing(files, TableVersion("lance", uri, dataset.version))


@lru_cache(maxsize=4)
def _dataset(uri: str, version: int, options_key: str) -> Any:
    return open_dataset(uri, json.loads(options_key), version)


def lance_batches(info: dict[str, Any], piece: Any, columns: list[str] | None,
                  batch_rows: int, storage_options: dict[str, Any]) -> Iterator[pa.Table]:
    """A fragment's live rows (a range of them for a ``rows`` piece), deletes applied."""
    dataset = _dataset(info["table"], info["version"], json.dumps(storage_options,
                                                                  sort_keys=True, default=str))
    fragment = dataset.get_fragment(info["fragment"])
    if fragment is None:
        raise InputError(f"{piece.uri}: fragment {info['fragment']} is not in version "
                         f"{info['version']} of {info['table']}")
    schema = dataset.schema if columns is None else pa.schema(
        [dataset.schema.field(c) for c in columns])
    yield schema.empty_table()
    window: dict[str, Any] = {}
    if piece.kind == "rows":
        window = {"offset": piece.start, "limit": piece.end - piece.start}
        if piece.end <= piece.start:
            return
    for batch in fragment.to_batches(columns=columns, batch_size=batch_rows, **window):
        yield pa.Table.from_batches([batch])

"""Apache Iceberg input through ``pyiceberg``: the data files of one snapshot, planned from its
manifests (partitions and column statistics prune files against ``input.filter``).

The table is named either by ``input.table`` in ``input.catalog`` (pyiceberg catalog
properties: a SQL catalog on SQLite or Postgres, REST, Glue, Hive...), or by ``input.uri``, a
table metadata file, with no catalog. Each data file of the snapshot is one Parquet input
file; its identity is its path and row count plus the delete files that apply to it. Position
delete files are applied by the worker; equality deletes are refused at planning, naming the
file (pyiceberg cannot read them either).

Storage: pyiceberg's FileIO takes its own property names. ``input.storage_options`` in
fsspec's spelling (``key``, ``secret``, ``client_kwargs.endpoint_url``) is mapped onto them,
and catalog properties in pyiceberg's spelling (``s3.endpoint``...) onto fsspec's for the
workers, so one of the two is enough.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.arrow_types import encode_schema, plain_schema
from pipeline.errors import ConfigError, InputError, cause_text
from pipeline.listing import InputFile
from pipeline.sources.base import Listing, TableVersion, deletes_id, read_info
from pipeline.spec import InputSpec

S3_PROPERTIES = {"key": "s3.access-key-id", "secret": "s3.secret-access-key",
                 "token": "s3.session-token"}


def io_properties(storage_options: dict[str, Any]) -> dict[str, str]:
    """fsspec storage options as pyiceberg FileIO properties."""
    props = {prop: str(storage_options[key]) for key, prop in S3_PROPERTIES.items()
             if storage_options.get(key)}
    client = storage_options.get("client_kwargs") or {}
    endpoint = storage_options.get("endpoint_url") or client.get("endpoint_url")
    if endpoint:
        props["s3.endpoint"] = str(endpoint)
    region = client.get("region_name") or (storage_options.get("config_kwargs") or {}).get(
        "region_name")
    if region or props:
        # Always a region: without one the AWS SDK asks the instance metadata service
        # (169.254.169.254) and then the bucket, a wait off the machine for nothing.
        props["s3.region"] = str(region or "us-east-1")
    return props


def fsspec_options(properties: dict[str, Any]) -> dict[str, Any]:
    """pyiceberg S3 properties as fsspec storage options (the reverse of ``io_properties``)."""
    options: dict[str, Any] = {key: properties[prop] for key, prop in S3_PROPERTIES.items()
                               if properties.get(prop)}
    client = {}
    if properties.get("s3.endpoint"):
        client["endpoint_url"] = properties["s3.endpoint"]
    if properties.get("s3.region"):
        client["region_name"] = properties["s3.region"]
    if client:
        options["client_kwargs"] = client
    return options


def worker_storage_options(spec: InputSpec) -> dict[str, Any]:
    """What workers read data and delete files with."""
    return spec.storage_options or fsspec_options(spec.catalog)


def open_catalog(catalog: dict[str, Any], storage_options: dict[str, Any], key: str) -> Any:
    """A pyiceberg catalog from its properties (``key``: input.catalog or output.catalog)."""
    from pyiceberg.catalog import load_catalog

    props = {**io_properties(storage_options), **catalog}
    name = str(catalog.get("name", "default"))
    try:
        return load_catalog(name, **{k: v for k, v in props.items() if k != "name"})
    except Exception as exc:
        raise ConfigError(f"{key}: cannot open the Iceberg catalog "
                          f"({cause_text(exc, catalog, storage_options)})") from exc


def load_table(spec: InputSpec) -> Any:
    props = {**io_properties(spec.storage_options), **spec.catalog}
    if spec.table is not None:
        catalog = open_catalog(spec.catalog, spec.storage_options, "input.catalog")
        try:
            return catalog.load_table(spec.table)
        except Exception as exc:
            raise InputError(f"input.table: cannot load Iceberg table {spec.table} "
                             f"({cause_text(exc, spec.catalog, spec.storage_options)})") from exc
    from pyiceberg.table import StaticTable

    try:
        return StaticTable.from_metadata(str(spec.uri), properties=props)
    except Exception as exc:
        raise InputError(f"input.uri: {spec.uri} is no Iceberg table metadata file "
                         f"({cause_text(exc, spec.storage_options)})") from exc


def list_iceberg(spec: InputSpec, version: int | None) -> Listing:
    table = load_table(spec)
    where = spec.table or str(spec.uri)
    snapshot = table.snapshot_by_id(version) if version is not None else table.current_snapshot()
    if snapshot is None:
        if version is not None:
            raise InputError(f"input.version: Iceberg table {where} has no snapshot {version}")
        return Listing([], TableVersion("iceberg", table.metadata_location, None, spec.table,
                                        table.location()))
    schema = table.schemas().get(snapshot.schema_id, table.schema())
    arrow = plain_schema(schema.as_arrow())
    encoded = encode_schema(arrow)
    scan = table.scan(row_filter=spec.filter or "True", snapshot_id=snapshot.snapshot_id)
    try:
        tasks = list(scan.plan_files())
    except Exception as exc:
        raise InputError(f"input: cannot plan Iceberg table {where} at snapshot "
                         f"{snapshot.snapshot_id} ({cause_text(exc, spec.storage_options)})") from exc
    files = []
    for task in tasks:
        data = task.file
        deletes = sorted(task.delete_files, key=lambda d: d.file_path)
        equality = [d for d in deletes if d.content.name == "EQUALITY_DELETES"]
        if equality:
            raise InputError(f"input: {equality[0].file_path} is an Iceberg equality delete "
                             f"file (applies to {data.file_path}); equality deletes are not "
                             "supported: compact the table (rewrite_data_files) first")
        identity = f"rows={data.record_count},size={data.file_size_in_bytes}"
        if deletes:
            identity += f",del={deletes_id([d.file_path for d in deletes])}"
        files.append(InputFile(
            uri=data.file_path, format="parquet", size=int(data.file_size_in_bytes),
            version=identity, columns=list(arrow.names), schema=encoded,
            bytes_per_row=data.file_size_in_bytes / data.record_count if data.record_count
            else None,  # sizes shards from the manifest, no footer read
            read=read_info(source="iceberg", deletes=[d.file_path for d in deletes],
                           metadata=table.metadata_location, schema_id=snapshot.schema_id)))
    files.sort(key=lambda f: f.uri)
    return Listing(files, TableVersion("iceberg", table.metadata_location, snapshot.snapshot_id,
                                       spec.table, table.location()))


@lru_cache(maxsize=8)
def _static(metadata: str, options_key: str) -> Any:
    from pyiceberg.table import StaticTable

    return StaticTable.from_metadata(metadata, properties=io_properties(json.loads(options_key)))


def _schema_of(info: dict[str, Any], options_key: str) -> Any:
    table = _static(info["metadata"], options_key)
    return table.schemas().get(info.get("schema_id"), table.schema())


def field_ids(info: dict[str, Any], storage_options: dict[str, Any]) -> dict[str, int]:
    """Worker side: the table's top-level column names -> Iceberg field ids."""
    key = json.dumps(storage_options, sort_keys=True, default=str)
    return {f.name: f.field_id for f in _schema_of(info, key).fields}


def table_schema(info: dict[str, Any], storage_options: dict[str, Any]) -> pa.Schema:
    """Worker side: the snapshot's schema (columns a data file predates)."""
    key = json.dumps(storage_options, sort_keys=True, default=str)
    return plain_schema(_schema_of(info, key).as_arrow())


@lru_cache(maxsize=64)
def _positions(delete_file: str, options_key: str) -> dict[str, np.ndarray]:
    """A position delete file as {data file path: deleted positions} (cached per worker)."""
    fs, path = storage.filesystem(delete_file, json.loads(options_key))
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["file_path", "pos"])
    found: dict[str, list[np.ndarray]] = {}
    for name in pa.compute.unique(table["file_path"]).to_pylist():
        rows = table.filter(pa.compute.equal(table["file_path"], name))
        found.setdefault(name, []).append(rows["pos"].to_numpy())
    return {k: np.concatenate(v) for k, v in found.items()}


def deleted_positions(info: dict[str, Any], data_file: str,
                      storage_options: dict[str, Any]) -> np.ndarray | None:
    if not info.get("deletes"):
        return None
    key = json.dumps(storage_options, sort_keys=True, default=str)
    found = [_positions(d, key).get(data_file) for d in info["deletes"]]
    found = [f for f in found if f is not None]
    return np.unique(np.concatenate(found)) if found else np.array([], dtype=np.int64)

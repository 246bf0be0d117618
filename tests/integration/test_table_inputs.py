"""Tables as inputs: Delta, Lance and Iceberg tables read at one version through their log or
manifests, deletes applied, every live row scored exactly once with the right values, older
versions pinned, incremental runs by version, and file jobs on a table's folder refused
(real deltalake, lance and pyiceberg with its SQL catalog on SQLite, real Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

import pipeline
from pipeline.demo.tabular import make_scoring_table
from pipeline.errors import ConfigError, InputError
from pipeline.layout import OutputLayout
from pipeline.planning import plan_job
from pipeline.spec import JobSpec

pytestmark = pytest.mark.usefixtures("ray_cluster")

SECRET = "iceberg-catalog-secret-0123456789"


def rows(start: int, count: int, seed: int) -> pa.Table:
    """Breast-cancer demo rows with ids from ``start`` and a ``lang`` column."""
    table = make_scoring_table(count, seed=seed, start_id=start)
    return table.append_column("lang", pa.array(["en", "de", "fr"] * (count // 3)
                                                + ["en"] * (count % 3)))


def table_job(models_dir: Path, source: dict, output: Path | str, **output_extra) -> dict:
    return {
        "name": "tables",
        "input": source,
        "model": {"uri": str(models_dir / "breast_cancer")},
        "task": {"kind": "classify"},
        "passthrough": ["id", "lang"],
        "sharding": {"rows_per_shard": 40},
        "workers": {"cpu": {"replicas": 2, "cpus": 1}},
        "output": {"uri": str(output), **output_extra},
    }


def expected(models_dir: Path, live: pa.Table) -> dict[int, tuple]:
    """What scoring ``live`` in this process gives, by id: (label, score)."""
    scored = pipeline.score(live, model=str(models_dir / "breast_cancer"), passthrough=["id"])
    return {i: (label, round(score, 6)) for i, label, score in
            zip(scored["id"].to_pylist(), scored["label"].to_pylist(),
                scored["score"].to_pylist(), strict=True)}


def written(table: pa.Table) -> dict[int, tuple]:
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    return {i: (label, round(score, 6)) for i, label, score in
            zip(ids, table["label"].to_pylist(), table["score"].to_pylist(), strict=True)}


# ----------------------------------------------------------------------------- Delta


def file_records(uri: str) -> dict[str, int]:
    """The table's data files now, with their row counts, from its log."""
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    return dict(zip(actions["path"].to_pylist(), actions["num_records"].to_pylist(), strict=True))


@pytest.fixture()
def delta_table(tmp_path: Path) -> tuple[str, list[pa.Table]]:
    """Version 0: 60 rows in three partitions; 1: 30 rows appended; 2: ids < 12 deleted (the
    files holding them rewritten). Returns the URI and each version's live rows."""
    uri = str(tmp_path / "delta")
    v0 = rows(0, 60, seed=1)
    write_deltalake(uri, v0, partition_by=["lang"])
    write_deltalake(uri, rows(100, 30, seed=2), mode="append")
    DeltaTable(uri).delete("id < 12")
    v1 = pa.concat_tables([v0, rows(100, 30, seed=2)])
    v2 = v1.filter(pa.compute.greater_equal(v1["id"], 12))
    return uri, [v0, v1, v2]


def test_delta_current_pinned_and_filtered(models_dir: Path, tmp_path: Path,
                                           delta_table: tuple[str, list[pa.Table]]) -> None:
    uri, versions = delta_table
    source = {"uri": uri, "format": "delta"}
    current = pipeline.run_job(table_job(models_dir, source, tmp_path / "now"), progress=False)
    assert current.ok, current.report["failures"]
    assert written(current.read()) == expected(models_dir, versions[2])
    assert current.report["run"]["input_table"]["version"] == 2
    job_json = OutputLayout(str(tmp_path / "now")).read_json("job.json")
    assert job_json["input_table"]["version"] == 2 and job_json["spec"]["input"]["version"] == 2
    lang = current.read().sort_by("id")["lang"].to_pylist()  # partition values added back
    assert lang == versions[2].sort_by("id")["lang"].to_pylist()

    # Version 0 pinned, into a Delta output: exactly its rows, the deleted ones included.
    pinned = pipeline.run_job(table_job(models_dir, {**source, "version": 0}, tmp_path / "v0",
                                        format="delta"), progress=False)
    assert pinned.ok
    assert written(DeltaTable(str(tmp_path / "v0")).to_pyarrow_table()) == \
        expected(models_dir, versions[0])

    # The table moves on; the first job, rerun, finishes over the version it read.
    write_deltalake(uri, rows(200, 9, seed=3), mode="append")
    again = pipeline.run_job(table_job(models_dir, source, tmp_path / "now"), progress=False)
    assert again.ok and again.report["totals"]["run_now"] == 0
    assert again.report["run"]["input_table"]["version"] == 2

    # A filter on the partition column prunes files from the log and filters rows.
    spec = table_job(models_dir, {**source, "filter": "lang = 'en' AND id >= 20"},
                     tmp_path / "en")
    planned = plan_job(JobSpec.model_validate(spec))
    assert {f.uri.split("/")[-2] for f in planned.plan.files} == {"lang=en"}
    # A range on a column with statistics prunes files by the log's min and max.
    late = plan_job(JobSpec.model_validate(table_job(models_dir, {**source, "filter": "id >= 100"},
                                                     tmp_path / "late")))
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True))
    holding = {p.rsplit("/", 1)[-1] for p, high in zip(actions["path"].to_pylist(),
                                                        actions["max.id"].to_pylist(), strict=True)
               if high >= 100}
    assert {f.uri.rsplit("/", 1)[-1] for f in late.plan.files} == holding
    assert 0 < len(holding) < actions.num_rows
    filtered = pipeline.run_job(spec, progress=False)
    live = pa.table(DeltaTable(uri).to_pyarrow_table())  # version 3: the append included
    want = live.filter((pa.compute.field("lang") == "en") & (pa.compute.field("id") >= 20))
    assert sorted(filtered.read()["id"].to_pylist()) == sorted(want["id"].to_pylist())


def test_delta_incremental_by_version(models_dir: Path, tmp_path: Path,
                                      delta_table: tuple[str, list[pa.Table]]) -> None:
    uri, versions = delta_table
    spec = table_job(models_dir, {"uri": uri, "format": "delta"}, tmp_path / "out",
                     mode="incremental", format="delta")
    # Shards smaller than every file: no shard packs two files, so what a run computes is
    # exactly the rows of the files that changed (packed small files are recomputed with a
    # changed neighbour).
    spec["sharding"] = {"rows_per_shard": 8}
    first = pipeline.run_job(spec, progress=False)
    assert first.ok and written(first.read()) == expected(models_dir, versions[2])

    # Night 2: an append (a file per partition), and a delete that rewrites one file.
    before = file_records(uri)
    write_deltalake(uri, rows(300, 12, seed=4), mode="append")
    DeltaTable(uri).delete("id = 13")
    second = pipeline.run_job(spec, progress=False)
    live = pa.table(DeltaTable(uri).to_pyarrow_table())
    assert second.ok and written(second.read()) == expected(models_dir, live)
    now = file_records(uri)
    files = second.report["run"]["input_files"]
    assert files["new"]["count"] == len(set(now) - set(before)) == 4
    assert files["deleted"]["count"] == len(set(before) - set(now)) == 1
    assert files["unchanged"] == len(set(now) & set(before)) == 5
    # Only the rows of new and rewritten files were computed; untouched files cost nothing.
    run_rows = second.report["run"]["rows"]
    assert run_rows["added"] == sum(now[f] for f in set(now) - set(before))
    assert run_rows["removed"] == sum(before[f] for f in set(before) - set(now))
    assert run_rows["total"] == live.num_rows

    # Night 3: compaction rewrites every file; nothing new to score but the same rows.
    DeltaTable(uri).optimize.compact()
    third = pipeline.run_job(spec, progress=False)
    assert third.ok and written(third.read()) == written(second.read())
    assert third.report["run"]["input_table"]["version"] == DeltaTable(uri).version()


# ----------------------------------------------------------------------------- Lance


def test_lance_deletes_pinned_versions_and_incremental(models_dir: Path, tmp_path: Path) -> None:
    uri = str(tmp_path / "items.lance")
    v1 = rows(0, 90, seed=5)
    lance.write_dataset(v1, uri, max_rows_per_file=30)  # three fragments
    spec = table_job(models_dir, {"uri": uri, "format": "lance"}, tmp_path / "out",
                     mode="incremental", format="lance")
    first = pipeline.run_job(spec, progress=False)
    assert first.ok and written(first.read()) == expected(models_dir, v1)

    lance.dataset(uri).delete("id IN (31, 32, 40)")  # a deletion file in the second fragment
    second = pipeline.run_job(spec, progress=False)
    live = lance.dataset(uri).to_table()
    assert second.ok and written(second.read()) == expected(models_dir, live)
    assert second.report["totals"]["run_now"] == 1  # only the fragment with deletes
    assert len(second.report["run"]["shards"]["replaced"]) == 1

    # The first version, pinned, still has every row.
    pinned = pipeline.run_job(table_job(models_dir, {"uri": uri, "format": "lance", "version": 1},
                                        tmp_path / "v1"), progress=False)
    assert pinned.ok and written(pinned.read()) == expected(models_dir, v1)


# ----------------------------------------------------------------------------- Iceberg


@pytest.fixture()
def iceberg_catalog(tmp_path: Path) -> dict:
    from pyiceberg.catalog.sql import SqlCatalog

    props = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
             "warehouse": f"file://{tmp_path}/warehouse"}
    catalog = SqlCatalog("default", **{k: v for k, v in props.items() if k != "type"})
    catalog.create_namespace("db")
    return props


def iceberg_with(props: dict, name: str, data: pa.Table) -> tuple:
    """The catalog, and a new table ``name`` in it holding ``data`` (one snapshot)."""
    from pyiceberg.catalog import load_catalog

    catalog = load_catalog("default", **props)
    table = catalog.create_table(name, schema=data.schema)
    table.append(data)
    return catalog, table


def test_iceberg_catalog_snapshots_and_secrets(models_dir: Path, tmp_path: Path,
                                               iceberg_catalog: dict) -> None:
    v1 = rows(0, 60, seed=7)
    catalog, table = iceberg_with(iceberg_catalog, "db.items", v1)
    first_snapshot = table.current_snapshot().snapshot_id
    first_metadata = table.metadata_location
    table.append(rows(100, 30, seed=8))
    table.delete("id < 10")  # copy-on-write: the first file is rewritten
    live = catalog.load_table("db.items").scan().to_arrow()
    assert live.num_rows == 80

    # Through the catalog, credentials in its properties: they reach no file we write.
    source = {"format": "iceberg", "table": "db.items",
              "catalog": {**iceberg_catalog, "s3.secret-access-key": SECRET}}
    now = pipeline.run_job(table_job(models_dir, source, tmp_path / "now", format="delta"),
                           progress=False)
    assert now.ok, now.report["failures"]
    assert written(now.read()) == expected(models_dir, live)
    assert now.report["run"]["input_table"]["table"] == "db.items"
    for path in (tmp_path / "now").rglob("*"):
        if path.is_file() and path.suffix in (".json", ""):
            assert SECRET not in path.read_text(errors="ignore"), path

    # The first snapshot, through its metadata file with no catalog; a filter on statistics.
    pinned = pipeline.run_job(table_job(models_dir, {"format": "iceberg", "uri": first_metadata,
                                                     "version": first_snapshot},
                                        tmp_path / "v1"), progress=False)
    assert pinned.ok and written(pinned.read()) == expected(models_dir, v1)
    spec = table_job(models_dir, {**source, "filter": "id >= 100"}, tmp_path / "late")
    planned = plan_job(JobSpec.model_validate(spec))
    assert len(planned.plan.files) == 1  # the rewritten first file is pruned by its statistics
    late = pipeline.run_job(spec, progress=False)
    assert sorted(late.read()["id"].to_pylist()) == list(range(100, 130))


# ----------------------------------------------------------------------------- refusals


def test_file_jobs_on_table_folders_and_bad_versions_are_refused(
        models_dir: Path, tmp_path: Path, delta_table: tuple[str, list[pa.Table]],
        iceberg_catalog: dict) -> None:
    from pyiceberg.catalog import load_catalog

    delta_uri, _ = delta_table
    lance_uri = str(tmp_path / "l.lance")
    lance.write_dataset(rows(0, 6, seed=9), lance_uri)
    iceberg = load_catalog("default", **iceberg_catalog).create_table(
        "db.t", schema=rows(0, 3, seed=1).schema)
    iceberg.append(rows(0, 3, seed=1))
    iceberg_root = iceberg.location().removeprefix("file://")
    cases = [(delta_uri, "Delta", "delta"), (delta_uri + "/lang=en", "Delta", "delta"),
             (lance_uri, "Lance", "lance"), (iceberg_root + "/data", "Iceberg", "iceberg"),
             (delta_uri + "/lang=en/*.parquet", "Delta", "delta")]
    for uri, name, fmt in cases:
        with pytest.raises(InputError) as caught:
            pipeline.run_job(table_job(models_dir, {"uri": uri}, tmp_path / "o"), progress=False)
        message = str(caught.value)
        assert f"a {name} table" in message and f"input.format: {fmt}" in message, message
        assert "\n" not in message
    with pytest.raises(InputError, match="has no version 99"):
        pipeline.run_job(table_job(models_dir, {"uri": delta_uri, "format": "delta",
                                                "version": 99}, tmp_path / "o"), progress=False)
    with pytest.raises(ConfigError, match=r"input\.filter: column 'nope' is not in the input"):
        pipeline.run_job(table_job(models_dir, {"uri": delta_uri, "format": "delta",
                                                "filter": "nope = 1"}, tmp_path / "o"),
                         progress=False)
    with pytest.raises(ConfigError, match=r"input\.filter: cannot parse"):
        pipeline.run_job(table_job(models_dir, {"uri": delta_uri, "format": "delta",
                                                "filter": "id >>> 3"}, tmp_path / "o"),
                         progress=False)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- S3


def test_tables_on_the_s3_endpoint(models_dir: Path, tmp_path: Path, s3_bucket: str,
                                   s3_options: dict) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    from pipeline.sinks.object_store import object_store_options
    from pipeline.sources.iceberg import io_properties

    base = f"s3://{s3_bucket}"
    data = rows(0, 45, seed=11)
    delta_uri, lance_uri = f"{base}/delta", f"{base}/items.lance"
    write_deltalake(delta_uri, data, storage_options=object_store_options(delta_uri, s3_options))
    lance.write_dataset(data, lance_uri, storage_options=object_store_options(lance_uri,
                                                                              s3_options))
    catalog = SqlCatalog("default", uri=f"sqlite:///{tmp_path}/s3catalog.db",
                         warehouse=f"{base}/warehouse", **io_properties(s3_options))
    catalog.create_namespace("db")
    catalog.create_table("db.items", schema=data.schema).append(data)
    want = expected(models_dir, data)
    iceberg_source = {"format": "iceberg", "table": "db.items",
                      "catalog": {"type": "sql", "uri": f"sqlite:///{tmp_path}/s3catalog.db",
                                  "warehouse": f"{base}/warehouse", **io_properties(s3_options)}}
    for name, source in (("delta", {"uri": delta_uri, "format": "delta",
                                    "storage_options": s3_options}),
                         ("lance", {"uri": lance_uri, "format": "lance",
                                    "storage_options": s3_options}),
                         ("iceberg", iceberg_source)):
        # The tables are read from the endpoint; the output (tested on S3 by the sinks' own
        # tests) stays local, which keeps this test cheap.
        result = pipeline.run_job(table_job(models_dir, source, tmp_path / f"out-{name}"),
                                  progress=False)
        assert result.ok, (name, result.report["failures"])
        assert written(result.read()) == want, name


def test_view_types_of_a_delta_rewrite_are_scored(models_dir: Path, tmp_path: Path) -> None:
    """delta-rs writes string_view when it rewrites files; a passthrough text column of
    those files keeps its values."""
    uri = str(tmp_path / "views")
    data = rows(0, 30, seed=12).append_column("note", pa.array([f"n{i}" for i in range(30)]))
    write_deltalake(uri, data)
    DeltaTable(uri).delete("id = 3")  # the rewritten file is written by delta-rs
    types = {pq.read_schema(Path(uri) / p).field("note").type
             for p in DeltaTable(uri).file_uris() for p in [p.split(uri + "/")[-1]]}
    spec = table_job(models_dir, {"uri": uri, "format": "delta"}, tmp_path / "o")
    spec["passthrough"] = ["id", "note"]
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    out = result.read().sort_by("id")
    assert out["note"].to_pylist() == [f"n{i}" for i in range(30) if i != 3]
    assert types  # the rewritten file was read (its type may be string or string_view)
    assert json.dumps(result.report["run"]["input_table"])
    assert np.all(np.isfinite(out["score"].to_numpy()))


def add_position_deletes(table, data_path: str, positions: list[int], path: Path) -> None:
    """A real Iceberg position delete file (file_path, pos) committed through pyiceberg's
    snapshot producer. pyiceberg's own deletes are copy-on-write, so none writes one; its
    scan applies this one, which is what the pipeline is checked against."""
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.typedef import Record

    pq.write_table(pa.table({"file_path": pa.array([data_path] * len(positions), pa.string()),
                             "pos": pa.array(positions, pa.int64())}), path)
    delete = DataFile.from_args(content=DataFileContent.POSITION_DELETES,
                                file_path=f"file://{path}", file_format=FileFormat.PARQUET,
                                partition=Record(), record_count=len(positions),
                                file_size_in_bytes=path.stat().st_size,
                                spec_id=table.metadata.default_spec_id)
    with table.transaction() as tx, tx.update_snapshot().fast_append() as append:
        append.append_data_file(delete)


def test_iceberg_position_deletes_across_row_ranges(models_dir: Path, tmp_path: Path,
                                                    iceberg_catalog: dict) -> None:
    data = rows(0, 90, seed=13)
    catalog, table = iceberg_with(iceberg_catalog, "db.deleted", data)
    data_path = next(iter(table.scan().plan_files())).file.file_path
    source = {"format": "iceberg", "table": "db.deleted", "catalog": iceberg_catalog}
    spec = table_job(models_dir, source, tmp_path / "out", mode="incremental")
    spec["sharding"] = {"rows_per_shard": 30}  # one file, three row ranges
    first = pipeline.run_job(spec, progress=False)
    assert first.ok and first.report["totals"]["shards"] == 3

    # Rows at the start, the middle (two ranges) and the very end of the file are deleted.
    add_position_deletes(catalog.load_table("db.deleted"), data_path, [3, 29, 30, 89],
                         tmp_path / "warehouse" / "deletes.parquet")
    live = catalog.load_table("db.deleted").scan().to_arrow()
    assert live.num_rows == 86  # pyiceberg's own reading applies them
    second = pipeline.run_job(spec, progress=False)
    assert second.ok, second.report["failures"]
    assert written(second.read()) == expected(models_dir, live)
    assert second.report["run"]["input_files"]["changed"]["count"] == 1  # its deletes changed

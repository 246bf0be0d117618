"""Tables as outputs: Iceberg as a sink (one snapshot per run, replayed commits add nothing,
incremental runs replace and retire files), and merge by key into Delta, Lance and Iceberg
tables, predictions written back into the input table itself (real pyiceberg with its SQL
catalog on SQLite, real deltalake and lance, real Ray)."""

from __future__ import annotations

from pathlib import Path

import lance
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

import pipeline
from pipeline.errors import ConfigError
from pipeline.metadata import COMMIT_RUN
from tests.integration.test_table_inputs import expected, rows, table_job, written
from tests.support.jobs import from_scratch, rows_of, run_driver, write_scoring_file
from tests.support.jobs import tabular_job as file_job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def catalog_props(tmp_path: Path) -> dict:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/warehouse"}


def iceberg_table(props: dict, name: str):
    from pyiceberg.catalog import load_catalog

    return load_catalog("default", **props).load_table(name)


def test_iceberg_sink_snapshots_per_run_and_replays(models_dir: Path, tmp_path: Path) -> None:
    data, out, scratch = tmp_path / "in", tmp_path / "out", tmp_path / "scratch"
    write_scoring_file(data, "a.parquet", 60, seed=41, start_id=0)
    write_scoring_file(data, "b.parquet", 8, seed=42, start_id=1000)
    props = catalog_props(tmp_path)
    spec = file_job(models_dir, data, out, format="iceberg", table="scores.patients",
                    catalog=props)
    first = pipeline.run_job(spec, progress=False)
    assert first.ok, first.report["failures"]
    table = iceberg_table(props, "scores.patients")
    assert rows_of(table.scan().to_arrow()) == from_scratch(models_dir, data, scratch)
    assert table.current_snapshot().summary[COMMIT_RUN] == "1"
    assert first.report["run"]["table"]["committed"] is True

    # Run 2: b changes, c is new; the driver is killed right after the snapshot, before the
    # run manifest says so. The rerun finds its snapshot and adds nothing.
    write_scoring_file(data, "b.parquet", 10, seed=43, start_id=1000)
    write_scoring_file(data, "c.parquet", 30, seed=44, start_id=2000)
    killed = run_driver(spec, tmp_path, [{"point": "driver.after_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    snapshots = len(iceberg_table(props, "scores.patients").snapshots())
    resumed = pipeline.run_job(spec, progress=False)
    assert resumed.ok and resumed.report["run"]["run"] == 2
    table = iceberg_table(props, "scores.patients")
    assert len(table.snapshots()) == snapshots  # nothing committed twice
    assert rows_of(table.scan().to_arrow()) == from_scratch(models_dir, data, scratch)
    assert rows_of(resumed.read()) == rows_of(table.scan().to_arrow())
    # The snapshot before run 2 still reads run 1's rows (time travel).
    first_id = table.snapshots()[0].snapshot_id
    assert table.scan(snapshot_id=first_id).to_arrow().num_rows == 68

    # --fresh drops the table with its history.
    again = pipeline.run_job(spec, progress=False, fresh=True)
    assert again.ok and len(iceberg_table(props, "scores.patients").snapshots()) == 1


def test_merge_into_delta_by_key(models_dir: Path, tmp_path: Path) -> None:
    source = str(tmp_path / "source")
    write_deltalake(source, rows(0, 60, seed=21))
    spec = table_job(models_dir, {"uri": source, "format": "delta"}, tmp_path / "out",
                     format="delta", mode="merge", key=["id"])
    first = pipeline.run_job(spec, progress=False)
    assert first.ok, first.report["failures"]
    target = DeltaTable(str(tmp_path / "out"))
    assert written(pa.table(target.to_pyarrow_table())) == expected(models_dir,
                                                                    rows(0, 60, seed=21))

    # The source changes: rows 10..19 get new features (new predictions), 100..109 arrive.
    changed = rows(10, 10, seed=22)
    dt = DeltaTable(source)
    dt.delete("id >= 10 AND id < 20")
    write_deltalake(source, pa.concat_tables([changed, rows(100, 9, seed=23)]), mode="append")
    version = DeltaTable(str(tmp_path / "out")).version()
    second = pipeline.run_job(spec, progress=False)
    assert second.ok and second.report["run"]["table"]["committed"] is True
    merged = second.report["run"]["table"]
    # The delete rewrote the file of ids 0..59: its 50 rows are scored again with the 10
    # changed ones (60 matched keys, updated in place) and the 9 new rows are inserted.
    assert (merged["inserted"], merged["updated"]) == (9, 60)
    target = DeltaTable(str(tmp_path / "out"))
    assert target.version() == version + 1  # one merge commit
    live = pa.table(DeltaTable(source).to_pyarrow_table())
    assert written(pa.table(target.to_pyarrow_table())) == expected(models_dir, live)
    # A replay after a crash is tests/reliability/test_table_faults.py's (the chaos harness).


def test_merge_into_lance_and_iceberg_refuses_duplicate_keys(models_dir: Path,
                                                             tmp_path: Path) -> None:
    source = str(tmp_path / "source.lance")
    lance.write_dataset(rows(0, 45, seed=24), source)
    props = catalog_props(tmp_path)
    for fmt, extra in (("lance", {}), ("iceberg", {"table": "db.scores", "catalog": props})):
        spec = table_job(models_dir, {"uri": source, "format": "lance"}, tmp_path / f"o-{fmt}",
                         format=fmt, mode="merge", key=["id"], **extra)
        result = pipeline.run_job(spec, progress=False)
        assert result.ok, (fmt, result.report["failures"])
        assert written(result.read()) == expected(models_dir, rows(0, 45, seed=24)), fmt
    # Rows 5..9 updated in the source: the merge updates them and keeps the others.
    ds = lance.dataset(source)
    ds.delete("id >= 5 AND id < 10")
    lance.write_dataset(rows(5, 5, seed=25), source, mode="append")
    for fmt, extra in (("lance", {}), ("iceberg", {"table": "db.scores", "catalog": props})):
        spec = table_job(models_dir, {"uri": source, "format": "lance"}, tmp_path / f"o-{fmt}",
                         format=fmt, mode="merge", key=["id"], **extra)
        result = pipeline.run_job(spec, progress=False)
        assert result.ok, (fmt, result.report["failures"])
        assert written(result.read()) == expected(models_dir, lance.dataset(source).to_table())

    # The same id twice in one run's rows: refused before anything is merged.
    dup = str(tmp_path / "dup")
    write_deltalake(dup, pa.concat_tables([rows(0, 6, seed=26), rows(3, 3, seed=27)]))
    spec = table_job(models_dir, {"uri": dup, "format": "delta"}, tmp_path / "o-dup",
                     format="delta", mode="merge", key=["id"])
    result = pipeline.run_job(spec, progress=False)
    assert result.exit_code == 1
    failure = result.report["aborted"]  # the run's commit failed: its shards stand
    assert "output.key: key (id=3) appears 2 times" in failure, failure
    assert not (tmp_path / "o-dup" / "_delta_log").exists()
    with pytest.raises(ConfigError, match=r"output\.key: column 'nope'"):
        pipeline.run_job(table_job(models_dir, {"uri": dup, "format": "delta"}, tmp_path / "k",
                                   format="delta", mode="merge", key=["nope"]), progress=False)


def test_predictions_written_back_into_the_input_table(models_dir: Path, tmp_path: Path) -> None:
    source = str(tmp_path / "patients")
    data = rows(0, 30, seed=28)
    write_deltalake(source, data)
    spec = table_job(models_dir, {"uri": source, "format": "delta", "version": 0},
                     tmp_path / "state", format="delta", mode="merge", key=["id"], table=source)
    spec["passthrough"] = ["id"]
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    table = pa.table(DeltaTable(source).to_pyarrow_table())
    assert table.num_rows == 30
    assert {"mean_radius", "lang", "label", "score"} <= set(table.column_names)
    assert written(table) == expected(models_dir, data)

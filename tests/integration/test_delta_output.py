"""Delta Lake output: one table version per run, readers never see a run half done, and a
driver killed around the table commit leaves exactly one new version after the rerun
(real deltalake, real Ray, local files and the moto S3 endpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

import pipeline
from pipeline.layout import OutputLayout
from pipeline.runs import read_runs
from pipeline.sinks.object_store import object_store_options
from tests.support.jobs import from_scratch, rows_of, run_driver, write_scoring_file
from tests.support.jobs import tabular_job as job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def delta_rows(uri: str, options: dict | None = None, version: int | None = None) -> list[tuple]:
    table = DeltaTable(uri, storage_options=object_store_options(uri, options))
    if version is not None:
        table.load_as_version(version)
    return rows_of(table.to_pyarrow_table())


def test_delta_versions_per_run_and_crash_around_commit(models_dir: Path, tmp_path: Path) -> None:
    data, out, scratch = tmp_path / "in", tmp_path / "out", tmp_path / "scratch"
    write_scoring_file(data, "a.parquet", 60, seed=31, start_id=0)
    write_scoring_file(data, "b.parquet", 8, seed=32, start_id=1000)
    spec = job(models_dir, data, out, format="delta")

    first = pipeline.run_job(spec, progress=False)
    assert first.ok and first.report["run"]["table"]["version"] == 0
    run1 = from_scratch(models_dir, data, scratch)
    assert delta_rows(str(out)) == run1 == rows_of(first.read())

    # Run 2: b changes, c is new; the driver is killed after the last shard, before the
    # table commit. Readers still see run 1, complete.
    write_scoring_file(data, "b.parquet", 10, seed=33, start_id=1000)
    write_scoring_file(data, "c.parquet", 50, seed=34, start_id=2000)
    killed = run_driver(spec, tmp_path, [{"point": "driver.before_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert DeltaTable(str(out)).version() == 0
    assert delta_rows(str(out)) == run1
    assert read_runs(OutputLayout(str(out))).open["status"] == "committing"

    # The rerun resumes run 2: nothing recomputed, exactly one new version.
    resumed = pipeline.run_job(spec, progress=False)
    assert resumed.ok and resumed.report["totals"]["run_now"] == 0
    assert resumed.report["run"]["run"] == 2 and resumed.report["run"]["resumed"] == 1
    table = DeltaTable(str(out))
    assert table.version() == 1
    assert table.transaction_version(resumed.report["fingerprint"]) == 2
    run2 = from_scratch(models_dir, data, scratch)
    assert delta_rows(str(out)) == run2
    assert delta_rows(str(out), version=0) == run1  # time travel: every run is a version

    # Run 3: killed right after the commit, before the run is marked complete: the rerun
    # finds the run's transaction in the table and commits nothing again.
    (data / "a.parquet").unlink()
    killed = run_driver(spec, tmp_path, [{"point": "driver.after_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert DeltaTable(str(out)).version() == 2
    again = pipeline.run_job(spec, progress=False)
    assert again.ok and again.report["run"]["run"] == 3
    assert again.report["run"]["table"]["committed"] is False
    assert DeltaTable(str(out)).version() == 2
    assert delta_rows(str(out)) == from_scratch(models_dir, data, scratch)
    assert not any(r[0] < 1000 for r in delta_rows(str(out)))  # a's rows retired
    # Part files of retired shards stay for time travel; version 1 still reads whole.
    assert delta_rows(str(out), version=1) == run2

    # Run 4 is killed after its commit, and the input changes again before the rerun: the
    # resumed run 4 commits the difference too (a second version for run 4), nothing is lost.
    write_scoring_file(data, "d.parquet", 20, seed=35, start_id=3000)
    killed = run_driver(spec, tmp_path, [{"point": "driver.after_table_commit", "action": "kill"}])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert DeltaTable(str(out)).version() == 3
    write_scoring_file(data, "e.parquet", 20, seed=36, start_id=4000)
    fourth = pipeline.run_job(spec, progress=False)
    assert fourth.ok and fourth.report["run"]["run"] == 4
    assert fourth.report["run"]["table"]["committed"] is True
    assert DeltaTable(str(out)).version() == 4
    assert delta_rows(str(out)) == from_scratch(models_dir, data, scratch)


def test_delta_on_s3(models_dir: Path, tmp_path: Path, s3_bucket: str, s3_options: dict) -> None:
    data, scratch = tmp_path / "in", tmp_path / "scratch"
    write_scoring_file(data, "a.parquet", 50, seed=41, start_id=0)
    uri = f"s3://{s3_bucket}/embeddings"
    spec = job(models_dir, data, tmp_path / "unused", format="delta")
    spec["output"] = {**spec["output"], "uri": uri, "storage_options": s3_options}
    assert pipeline.run_job(spec, progress=False).ok
    write_scoring_file(data, "b.parquet", 30, seed=42, start_id=500)
    second = pipeline.run_job(spec, progress=False)
    assert second.ok and second.report["run"]["table"]["version"] == 1
    assert delta_rows(uri, s3_options) == from_scratch(models_dir, data, scratch)
    assert len(delta_rows(uri, s3_options, version=0)) == 50
    layout = OutputLayout(uri, s3_options)
    assert layout.fs.exists(f"{layout.root}/_delta_log/00000000000000000001.json")
    with layout.fs.open(f"{layout.root}/_pipeline/runs/000002.json", "rb") as fh:
        manifest = json.loads(fh.read())
    assert manifest["status"] == "complete" and manifest["table"]["added_files"] >= 1
    # A part file is a plain Parquet file carrying the job's fingerprint, as for Parquet output.
    part = sorted(p for p in layout.fs.ls(layout.root) if p.rsplit("/", 1)[-1].startswith("part-"))[0]
    with layout.fs.open(part, "rb") as fh:
        assert pq.read_schema(fh).metadata[b"pipeline.fingerprint"] == second.report["fingerprint"].encode()


def test_failed_table_commit_exits_1_and_the_rerun_commits(models_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = tmp_path / "in", tmp_path / "out"
    write_scoring_file(data, "a.parquet", 30, seed=61, start_id=0)
    spec = job(models_dir, data, out, format="delta")
    monkeypatch.setenv("PIPELINE_FAULTS", json.dumps(
        [{"point": "driver.before_table_commit", "action": "raise"}]))
    failed = pipeline.run_job(spec, progress=False)
    assert failed.exit_code == 1 and "the delta commit failed" in failed.report["aborted"]
    assert not (out / "_delta_log").exists() and not (out / "_SUCCESS").exists()
    monkeypatch.delenv("PIPELINE_FAULTS")
    again = pipeline.run_job(spec, progress=False)
    assert again.ok and again.report["totals"]["run_now"] == 0
    assert again.report["run"]["run"] == 1 and DeltaTable(str(out)).version() == 0
    assert len(delta_rows(str(out))) == 30


def test_delta_first_run_without_rows_then_rows(models_dir: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "in", tmp_path / "out"
    write_scoring_file(data, "a.parquet", 0, seed=71, start_id=0)
    spec = job(models_dir, data, out, format="delta")
    first = pipeline.run_job(spec, progress=False)
    assert first.ok and first.report["run"]["table"]["version"] is None
    assert not (out / "_delta_log").exists()
    write_scoring_file(data, "b.parquet", 12, seed=72, start_id=100)
    second = pipeline.run_job(spec, progress=False)
    assert second.ok and DeltaTable(str(out)).version() == 0
    assert len(delta_rows(str(out))) == 12
    # --fresh into another format removes the Delta table, not only the new format's folders.
    lance_spec = job(models_dir, data, out, format="lance")
    assert pipeline.run_job(lance_spec, progress=False, fresh=True).ok
    assert not (out / "_delta_log").exists() and (out / "_versions").exists()

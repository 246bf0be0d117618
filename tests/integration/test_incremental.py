"""Incremental runs over a growing input: each run equals a from-scratch run over the same
input, row for row, and recomputes only new and changed files (real Ray, real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.demo.tabular import make_scoring_table
from pipeline.errors import OutputError
from pipeline.job_file import load_spec
from pipeline.layout import OutputLayout
from pipeline.planning import describe_plan, plan_job
from pipeline.runs import read_runs
from tests.support.jobs import from_scratch, markers, rows_of, write_scoring_file
from tests.support.jobs import tabular_job as job

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_three_incremental_runs_equal_from_scratch(models_dir: Path, tmp_path: Path) -> None:
    data, out, scratch = tmp_path / "in", tmp_path / "out", tmp_path / "scratch"
    write_scoring_file(data, "a.parquet", 100, seed=1, start_id=0)  # split: 40 + 40 + 20 rows
    write_scoring_file(data, "b.parquet", 8, seed=2, start_id=1000)  # small files are packed
    write_scoring_file(data, "c.parquet", 8, seed=3, start_id=2000)
    write_scoring_file(data, "d.parquet", 8, seed=4, start_id=3000)

    # Run 1: everything is new.
    first = pipeline.run_job(job(models_dir, data, out), progress=False)
    assert first.ok
    assert rows_of(first.read()) == from_scratch(models_dir, data, scratch)
    assert first.report["run"]["run"] == 1 and first.report["run"]["status"] == "complete"
    before = markers(out)

    # Run 2: e and f are new, b changed (more rows), a, c, d untouched.
    write_scoring_file(data, "b.parquet", 12, seed=5, start_id=1000)
    write_scoring_file(data, "e.parquet", 50, seed=6, start_id=4000)
    write_scoring_file(data, "f.parquet", 8, seed=7, start_id=5000)
    dry = describe_plan(plan_job(load_spec(job(models_dir, data, out))))
    assert any(line.startswith("incremental: files +2 new, 1 changed, 0 deleted, 3 unchanged")
               for line in dry), dry
    second = pipeline.run_job(job(models_dir, data, out), progress=False)
    assert second.ok
    assert rows_of(second.read()) == from_scratch(models_dir, data, scratch)
    run = second.report["run"]
    assert run["run"] == 2
    assert run["input_files"]["new"]["count"] == 2
    assert [Path(u).name for u in run["input_files"]["changed"]["first"]] == ["b.parquet"]
    assert run["input_files"]["deleted"]["count"] == 0
    assert len(run["shards"]["replaced"]) == 1 and not run["shards"]["retired"]
    after = markers(out)
    a_shards = [sid for sid, m in before.items() if m["input"].endswith("a.parquet")]
    assert len(a_shards) == 3
    for sid in a_shards:  # never recomputed: the very same commit
        assert after[sid]["attempt_token"] == before[sid]["attempt_token"]
    assert second.report["totals"]["run_now"] == len(set(after) - set(before))
    new = set(after) - set(before)
    assert run["rows"]["added"] == sum(after[sid]["rows_out"] for sid in new)
    assert run["rows"]["removed"] == sum(before[sid]["rows_out"] for sid in run["shards"]["replaced"])
    assert run["rows"]["total"] == second.report["totals"]["rows_out"]

    # Run 3: c deleted, a changed, g new.
    (data / "c.parquet").unlink()
    write_scoring_file(data, "a.parquet", 90, seed=8, start_id=0)
    write_scoring_file(data, "g.parquet", 8, seed=9, start_id=6000)
    third = pipeline.run_job(job(models_dir, data, out), progress=False)
    assert third.ok
    expected = from_scratch(models_dir, data, scratch)
    assert rows_of(third.read()) == expected
    ids = [r[0] for r in expected]
    assert len(ids) == len(set(ids)) and not any(2000 <= i < 2100 for i in ids)
    run = third.report["run"]
    assert [Path(u).name for u in run["input_files"]["deleted"]["first"]] == ["c.parquet"]
    assert run["shards"]["retired"] or run["shards"]["replaced"]
    # Parquet output holds exactly the live shards' part files.
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == sorted(f"part-{sid}.parquet" for sid in markers(out))

    # Run 4: nothing changed -> nothing runs and no new manifest.
    fourth = pipeline.run_job(job(models_dir, data, out), progress=False)
    assert fourth.ok and fourth.report["totals"]["run_now"] == 0
    assert fourth.report["run"]["run"] == 3
    assert read_runs(OutputLayout(str(out))).last["run"] == 3
    assert (out / "_SUCCESS").exists()
    manifests = sorted(p.name for p in (out / "_pipeline" / "runs").iterdir())
    assert manifests == ["000001.json", "000002.json", "000003.json"]
    third_manifest = json.loads((out / "_pipeline" / "runs" / "000003.json").read_text())
    assert third_manifest["status"] == "complete"
    assert {s["id"] for s in third_manifest["ledger"]} == set(markers(out))


def test_deleted_inputs_keep(models_dir: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "in", tmp_path / "out"
    write_scoring_file(data, "a.parquet", 60, seed=11, start_id=0)
    write_scoring_file(data, "b.parquet", 60, seed=12, start_id=1000)
    spec = job(models_dir, data, out, deleted_inputs="keep")
    assert pipeline.run_job(spec, progress=False).ok
    (data / "b.parquet").unlink()
    result = pipeline.run_job(spec, progress=False)
    assert result.ok
    ids = {r[0] for r in rows_of(result.read())}
    assert ids == set(range(60)) | set(range(1000, 1060))  # b's rows stay
    # Nothing to compute or retire: no new run, and the report says why.
    assert result.report["run"]["run"] == 1 and result.report["totals"]["run_now"] == 0
    assert "1 deleted input files; their rows are kept" in result.report["notes"][0]
    write_scoring_file(data, "a.parquet", 30, seed=13, start_id=0)  # a changes: b's rows still kept
    result = pipeline.run_job(spec, progress=False)
    assert result.ok and result.report["run"]["run"] == 2
    ids = {r[0] for r in rows_of(result.read())}
    assert ids == set(range(30)) | set(range(1000, 1060))
    assert result.report["run"]["input_files"]["deleted"]["count"] == 1
    assert not result.report["run"]["shards"]["retired"]


def test_changed_model_is_refused_unless_fresh(models_dir: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "in", tmp_path / "out"
    write_scoring_file(data, "a.parquet", 20, seed=21, start_id=0)
    assert pipeline.run_job(job(models_dir, data, out), progress=False).ok
    changed = job(models_dir, data, out)
    changed["task"] = {"kind": "classify", "score_column": "p"}
    with pytest.raises(OutputError, match="fingerprint"):
        pipeline.run_job(changed, progress=False)
    result = pipeline.run_job(changed, progress=False, fresh=True)
    assert result.ok and result.report["run"]["run"] == 1
    assert "p" in result.read().column_names


def test_incremental_on_s3_follows_etags(models_dir: Path, tmp_path: Path, s3_bucket: str,
                                         s3_options: dict) -> None:
    """Input and output on the S3 endpoint: a rewritten object (new etag) is recomputed, a
    deleted one retired, a new one added; the Parquet output matches a from-scratch run."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)

    def put(name: str, rows: int, seed: int, start_id: int) -> None:
        table = make_scoring_table(rows, seed=seed, start_id=start_id)
        with fs.open(f"{s3_bucket}/in/{name}", "wb") as fh:
            pq.write_table(table, fh, row_group_size=40)

    for i, name in enumerate(["a.parquet", "b.parquet", "c.parquet"]):
        put(name, 50, seed=70 + i, start_id=1000 * i)
    spec = job(models_dir, tmp_path, tmp_path)
    spec["input"] = {"uri": f"s3://{s3_bucket}/in", "storage_options": s3_options}
    spec["output"] = {**spec["output"], "uri": f"s3://{s3_bucket}/out",
                      "storage_options": s3_options}
    assert pipeline.run_job(spec, progress=False).ok
    put("b.parquet", 50, seed=90, start_id=1000)  # same size, new content: a new etag
    fs.rm(f"{s3_bucket}/in/c.parquet")
    put("d.parquet", 20, seed=91, start_id=3000)
    second = pipeline.run_job(spec, progress=False)
    assert second.ok
    files = second.report["run"]["input_files"]
    assert (files["new"]["count"], files["changed"]["count"], files["deleted"]["count"]) == (1, 1, 1)
    scratch = {**spec, "output": {**spec["output"], "uri": f"s3://{s3_bucket}/scratch"}}
    expected = rows_of(pipeline.run_job(scratch, progress=False, fresh=True).read())
    assert rows_of(second.read()) == expected
    assert {r[0] // 1000 for r in expected} == {0, 1, 3}


def test_adopts_an_output_written_in_resume_mode(models_dir: Path, tmp_path: Path) -> None:
    """No run manifests yet: committed shards are matched to files through their markers, so
    unchanged files are kept, a changed one recomputed, and a deleted one's rows kept."""
    data, out = tmp_path / "in", tmp_path / "out"
    write_scoring_file(data, "a.parquet", 60, seed=81, start_id=0)
    write_scoring_file(data, "b.parquet", 60, seed=82, start_id=1000)
    write_scoring_file(data, "c.parquet", 60, seed=83, start_id=2000)
    resume = job(models_dir, data, out)
    resume["output"]["mode"] = "resume"
    assert pipeline.run_job(resume, progress=False).ok
    import shutil

    shutil.rmtree(out / "_pipeline" / "runs")  # as an output from before manifests existed
    before = markers(out)
    (data / "b.parquet").unlink()
    write_scoring_file(data, "c.parquet", 30, seed=84, start_id=2000)
    result = pipeline.run_job(job(models_dir, data, out, deleted_inputs="keep"), progress=False)
    assert result.ok
    files = result.report["run"]["input_files"]
    assert (files["new"]["count"], files["changed"]["count"], files["deleted"]["count"],
            files["unchanged"]) == (0, 1, 1, 1)
    after = markers(out)
    for sid, marker in before.items():
        if not marker["input"].endswith("c.parquet"):  # a and b: the very same commits
            assert after[sid]["attempt_token"] == marker["attempt_token"]
    ids = {r[0] for r in rows_of(result.read())}
    assert ids == set(range(60)) | set(range(1000, 1060)) | set(range(2000, 2030))

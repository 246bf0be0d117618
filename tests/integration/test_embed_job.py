"""The embed job end to end on a real local Ray cluster: layout, exactly-once, parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.metadata import META_FINGERPRINT, META_MODEL
from pipeline.plan import make_plan
from pipeline.report import summary_lines
from pipeline.state import JobReport
from tests.support.fixtures import write_text_parquet

pytestmark = pytest.mark.usefixtures("ray_cluster")


def embed_job(input_uri: str, output_uri: str, minilm: Path, **extra) -> dict:
    job = {
        "name": "embed-test",
        "input": {"uri": input_uri},
        "model": {"uri": str(minilm)},
        "task": {"kind": "embed", "text_column": "text"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 100},
        "workers": {"cpu": {"replicas": 2}},
        "retry": {"backoff_s": 0.1},
        "output": {"uri": output_uri},
    }
    for key, value in extra.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, text_rows) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_text_parquet(root / "a.parquet", text_rows[:250], 0)
    write_text_parquet(root / "b.parquet", text_rows[250:400], 250)
    return root


@pytest.fixture(scope="module")
def finished_job(small_text, tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("out") / "embed"
    result = pipeline.run_job(embed_job(str(small_text), str(out), minilm_dir), progress=False)
    return result, out


def test_job_commits_every_shard_and_writes_layout(finished_job, small_text):
    result, out = finished_job
    assert result.exit_code == 0
    plan = make_plan(str(small_text), None, {}, 100, ["id", "text"])
    assert len(plan.shards) > 2  # more shards than workers
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    markers = sorted(p.name for p in (out / "_pipeline" / "shards").glob("*.json"))
    assert parts == sorted(f"part-{s.id}.parquet" for s in plan.shards)
    assert markers == sorted(f"{s.id}.json" for s in plan.shards)
    assert (out / "_SUCCESS").exists()
    job = json.loads((out / "_pipeline" / "job.json").read_text())
    report = json.loads((out / "_pipeline" / "report.json").read_text())
    assert job["fingerprint"] == report["fingerprint"]
    assert report["totals"]["rows_in"] == report["totals"]["rows_out"] == 400
    assert report["status"] == "succeeded" and report["providers"] == {"cpu": len(plan.shards)}
    assert {w["pool"] for w in report["workers"]} == {"cpu"}
    assert sum(w["rows"] for w in report["workers"]) == 400


def test_markers_and_report_say_how_sessions_ran(finished_job):
    """Each worker's session set-up, as it really ran, is in its markers and the report: one
    thread per reserved CPU, spinning for batch work, the graph optimized once per node, and
    the CPU's batch sizes since the job sets none."""
    _, out = finished_job
    report = json.loads((out / "_pipeline" / "report.json").read_text())
    markers = [json.loads(p.read_text()) for p in (out / "_pipeline" / "shards").glob("*.json")]
    for m in markers:
        session = m["session"]
        assert session["providers"][0] == "cpu" and session["intra_op_threads"] == 1
        assert session["intra_op.allow_spinning"] == "1"
        assert session["batching"] == {"max_tokens": 2048, "max_rows": 64, "window_rows": 4096}
        assert session["graph"] in ("optimized and saved to the node cache",
                                    "loaded from the node cache")
    assert all(w["session"] == next(m["session"] for m in markers if m["worker"] == w["worker"])
               for w in report["workers"] if w["shards"])
    startup = report["startup"]
    assert 0 <= startup["ray_s"] < startup["first_worker_ready_s"] < startup["first_shard_s"]
    assert startup["first_shard_s"] == report["totals"]["first_shard_s"] < report["wall_s"]
    assert startup["plan_s"] > 0
    assert any(line.startswith("  session: cpu pool on cpu, 1 intra-op thread")
               for line in summary_lines(JobReport.read(report, "report.json")))


def test_every_input_id_exactly_once_and_matches_in_process_scoring(finished_job, text_rows,
                                                                    minilm_dir):
    result, _ = finished_job
    table = result.read()
    ids = table["id"].to_pylist()
    assert sorted(ids) == list(range(400))
    got = np.array(table["embedding"].to_pylist(), dtype=np.float32)
    reference = pipeline.score(pa.table({"text": [text_rows[i] for i in ids]}),
                               model=str(minilm_dir))
    want = np.array(reference["embedding"].to_pylist(), dtype=np.float32)
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999


def test_part_files_carry_fingerprint_and_model_hash(finished_job, minilm_dir):
    result, out = finished_job
    part = next(out.glob("part-*.parquet"))
    meta = pq.read_schema(part).metadata
    assert meta[META_FINGERPRINT].decode() == result.report["fingerprint"]
    assert meta[META_MODEL].decode() in (minilm_dir / "bundle.yaml").read_text()


def test_rerun_resumes_without_recomputing(finished_job, small_text, minilm_dir):
    _, out = finished_job
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = pipeline.run_job(embed_job(str(small_text), str(out), minilm_dir), progress=False)
    assert again.exit_code == 0
    assert again.report["totals"]["resumed"] == again.report["totals"]["shards"]
    assert again.report["totals"]["run_now"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == mtimes


def test_planner_is_deterministic(small_text, tmp_path, text_rows):
    first = make_plan(str(small_text), None, {}, 100, ["text"])
    second = make_plan(str(small_text), None, {}, 100, ["text"])
    assert [s.id for s in first.shards] == [s.id for s in second.shards]
    assert [s.pieces for s in first.shards] == [s.pieces for s in second.shards]
    # Another row-group size is another input: other shard ids.
    write_text_parquet(tmp_path / "a.parquet", text_rows[:250], 0, row_group_size=25)
    other = make_plan(str(tmp_path), None, {}, 100, ["text"])
    assert not {s.id for s in other.shards} & {s.id for s in first.shards}


def test_one_row_and_zero_row_inputs(tmp_path, minilm_dir, text_rows):
    write_text_parquet(tmp_path / "in1" / "one.parquet", text_rows[:1])
    one = pipeline.run_job(embed_job(str(tmp_path / "in1"), str(tmp_path / "o1"), minilm_dir),
                           progress=False)
    assert one.exit_code == 0 and one.read().num_rows == 1

    write_text_parquet(tmp_path / "in0" / "zero.parquet", [])
    zero = pipeline.run_job(embed_job(str(tmp_path / "in0"), str(tmp_path / "o0"), minilm_dir),
                            progress=False)
    assert zero.exit_code == 0
    assert zero.report["totals"]["rows_in"] == 0
    assert (tmp_path / "o0" / "_SUCCESS").exists()


def test_mixed_formats_and_sizes(tmp_path, minilm_dir, text_rows):
    import pyarrow.csv as pacsv
    import pyarrow.feather as feather

    src = tmp_path / "mixed"
    write_text_parquet(src / "big.parquet", text_rows[:230], 0)
    small = pa.table({"id": pa.array(range(230, 240), pa.int64()), "text": text_rows[230:240]})
    pacsv.write_csv(small, src / "small.csv")
    feather.write_feather(pa.table({"id": pa.array(range(240, 290), pa.int64()),
                                    "text": text_rows[240:290]}), src / "mid.arrow")
    with open(src / "tiny.jsonl", "w") as fh:
        for i in range(290, 293):
            fh.write(json.dumps({"id": i, "text": text_rows[i]}) + "\n")
    result = pipeline.run_job(embed_job(str(src), str(tmp_path / "out"), minilm_dir),
                              progress=False)
    assert result.exit_code == 0
    assert sorted(result.read()["id"].to_pylist()) == list(range(293))
    formats = {f.format for f in make_plan(str(src), None, {}, 100, ["text"]).files}
    assert formats == {"parquet", "csv", "ipc", "jsonl"}


def test_gpu_pool_on_logical_gpu_reports_cpu_fallback(tmp_path, minilm_dir, text_rows):
    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:60])
    job = embed_job(str(tmp_path / "in"), str(tmp_path / "out"), minilm_dir,
                    workers={"cpu": {"replicas": 0}, "gpu": {"replicas": 1, "gpus": 1}})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    assert result.report["pools"]["gpu"]["rows"] == 60
    assert result.report["providers"] == {"cpu": 1}
    assert any(f.startswith("cuda") and "running on cpu" in f for f in result.report["fallbacks"])


def test_unplaceable_workers_end_the_job_instead_of_hanging(tmp_path, minilm_dir, text_rows):
    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:10])
    # Declared shared storage: workers may run anywhere, so they wait for resources.
    job = embed_job(str(tmp_path / "in"), str(tmp_path / "out"), minilm_dir,
                    workers={"cpu": {"replicas": 1, "cpus": 64}, "start_timeout_s": 3},
                    storage={"shared_filesystem": True})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 1
    assert "no worker started within workers.start_timeout_s=3s" in result.report["aborted"]
    assert result.report["failures"][0]["last_error"].startswith("not run: no worker started")
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_node_local_data_keeps_workers_on_the_driver_node(tmp_path, minilm_dir, text_rows):
    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:10])
    # Node-local paths pin workers to the driver's node; one that cannot hold them fails fast.
    job = embed_job(str(tmp_path / "in"), str(tmp_path / "out"), minilm_dir,
                    workers={"cpu": {"replicas": 1, "cpus": 64}, "start_timeout_s": 60})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 1
    assert result.report["aborted"].startswith("workers cannot be placed on the driver's node")
    assert "node-local input or output" in result.report["aborted"]
    assert result.report["wall_s"] < 30


def test_resume_refuses_changed_model_or_input(tmp_path, minilm_dir, breast_cancer_dir,
                                               text_rows, capsys):
    from pipeline.run import main

    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:30])
    job = embed_job(str(tmp_path / "in"), str(tmp_path / "out"), minilm_dir)
    assert pipeline.run_job(job, progress=False).exit_code == 0
    path = tmp_path / "job.yaml"

    # Another task setting changes output values: another fingerprint, resume refused.
    changed = {**job, "task": {"kind": "embed", "max_length": 64}}
    import yaml

    path.write_text(yaml.safe_dump(changed))
    assert main([str(path), "--no-progress"]) == 2
    assert "resume refused: use --fresh" in capsys.readouterr().err
    # --fresh starts over and succeeds.
    assert main([str(path), "--no-progress", "--fresh"]) == 0
    capsys.readouterr()

    # The input file changes (other size): its old shards are not in the plan any more.
    write_text_parquet(tmp_path / "in" / "a.parquet", text_rows[:31])
    assert main([str(path), "--no-progress"]) == 2
    assert "input files changed since the first run" in capsys.readouterr().err


def test_orphaned_part_files_are_cleaned_before_success(finished_job, small_text, minilm_dir):
    _, out = finished_job
    stray = out / "part-0123456789abcdef0123.parquet"  # a failed attempt of a shard no longer planned
    pq.write_table(pa.table({"id": [999999]}), stray)
    again = pipeline.run_job(embed_job(str(small_text), str(out), minilm_dir), progress=False)
    assert again.exit_code == 0
    assert not stray.exists()
    assert 999999 not in again.read()["id"].to_pylist()

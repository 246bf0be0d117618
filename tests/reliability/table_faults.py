"""Fault trials with a table input and a table output, shared by the pytest suite (small) and
`make chaos` (more trials, larger): the driver killed between the table commit and the run
manifest of a merge, a worker killed mid-shard, a second writer committing to the output
table while the job commits, and the input table moving on during a job.

Each trial audits the output table against the input version it must reflect: rows lost,
rows duplicated, values wrong, and work redone.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

import pipeline
from pipeline.demo.tabular import make_scoring_table
from pipeline.layout import OutputLayout
from pipeline.runs import manifest_name
from tests.reliability.harness import IN_FLIGHT, MODELS, REPLICAS, REPO, Trial

MODEL = str(MODELS / "breast_cancer")


def _rows(start: int, count: int, seed: int) -> pa.Table:
    return make_scoring_table(count, seed=seed, start_id=start)


def write_delta_input(uri: str, rows: int, seed: int, files: int = 3) -> None:
    from deltalake import write_deltalake

    per = -(-rows // files)
    for i in range(files):
        start = i * per
        write_deltalake(uri, _rows(start, max(0, min(per, rows - start)), seed * 100 + i),
                        mode="append")


def table_job(source: dict, out: str, **output: Any) -> dict:
    return {
        "name": "table-chaos", "input": source, "model": {"uri": MODEL},
        "task": {"kind": "classify"}, "passthrough": ["id"],
        "sharding": {"rows_per_shard": 50},
        "workers": {"cpu": {"replicas": REPLICAS}, "max_in_flight": IN_FLIGHT},
        "retry": {"max_attempts": 4, "backoff_s": 0.05, "max_backoff_s": 0.5},
        "output": {"uri": out, **output},
    }


def expected_scores(live: pa.Table) -> dict[int, tuple]:
    scored = pipeline.score(live, model=MODEL, passthrough=["id"])
    return {i: (lab, round(s, 6)) for i, lab, s in zip(
        scored["id"].to_pylist(), scored["label"].to_pylist(), scored["score"].to_pylist(),
        strict=True)}


def audit_table(table: pa.Table, live: pa.Table) -> dict[str, int]:
    """Rows of the input version missing from the output table, written twice, or wrong."""
    ids = table["id"].to_pylist()
    want = expected_scores(live)
    got: dict[int, tuple] = {}
    duplicated = 0
    for i, lab, s in zip(ids, table["label"].to_pylist(), table["score"].to_pylist(), strict=True):
        duplicated += i in got
        got[i] = (lab, round(s, 6))
    return {"lost": len(set(want) - set(got)), "duplicated": duplicated,
            "wrong": sum(1 for i, v in want.items() if i in got and got[i] != v),
            "extra": len(set(got) - set(want))}


def _trial(fault: str, exit_code: int, a: dict[str, int], redone: int, bound: int,
           **details: Any) -> Trial:
    consistent = a["wrong"] == 0 and a["extra"] == 0
    return Trial(fault, exit_code, 0, a["lost"], a["duplicated"], redone, bound, consistent,
                 details)


def _driver(job: dict, work: Path, faults: list[dict]) -> subprocess.Popen:
    path = work / f"job-{len(list(work.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PIPELINE_FAULTS": json.dumps(faults)}
    import ray

    if ray.is_initialized():  # the trial's own cluster: no second Ray start per driver
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", str(path), "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_beside(job: dict, other: Any, slow_down: dict) -> Any:
    """The job in this process, slowed at one point, while ``other`` runs in a thread (the
    other writer, or the table moving on)."""
    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    os.environ["PIPELINE_FAULTS"] = json.dumps([slow_down])
    try:
        return pipeline.run_job(job, progress=False)
    finally:
        del os.environ["PIPELINE_FAULTS"]
        thread.join(timeout=60)


def _redone(layout: OutputLayout, before: dict[str, float]) -> int:
    """Committed shards (still held) whose marker changed: computed again."""
    held = layout.committed_shards()
    return sum(1 for sid, at in before.items()
               if sid in held and layout.read_marker(sid).committed_at != at)


def merge_commit_kill(work: Path, rows: int, seed: int) -> Trial:
    """A merge into a Delta table, the driver SIGKILLed just before or just after the merge
    commit (before the run manifest says so); the rerun leaves the table as one run would."""
    from deltalake import DeltaTable, write_deltalake

    rng = random.Random(seed)
    source, out = str(work / "source"), str(work / "out")
    write_delta_input(source, rows, seed)
    job = table_job({"uri": source, "format": "delta"}, out, format="delta", mode="merge",
                    key=["id"])
    first = pipeline.run_job(job, progress=False)
    # The input changes: a tenth of the rows get new features, a few new rows arrive.
    changed = sorted(rng.sample(range(rows), max(1, rows // 10)))
    DeltaTable(source).delete(f"id in ({', '.join(map(str, changed))})")
    fresh = pa.concat_tables([_rows(i, 1, seed * 7 + i) for i in changed]
                             + [_rows(rows + 1000, 20, seed + 99)])
    write_deltalake(source, fresh, mode="append")
    point = ["driver.before_table_commit", "driver.after_table_commit"][seed % 2]
    killed = _driver(job, work, [{"point": point, "action": "kill"}])
    killed.communicate(timeout=600)
    versions_before = DeltaTable(out).version()
    layout = OutputLayout(out)
    before = {s: layout.read_marker(s).committed_at for s in layout.committed_shards()}
    rerun = pipeline.run_job(job, progress=False)
    target = DeltaTable(out)
    merges = target.version() - versions_before  # after the kill: one merge at most
    a = audit_table(pa.table(target.to_pyarrow_table()),
                    pa.table(DeltaTable(source).to_pyarrow_table()))
    ok = first.ok and killed.returncode == -9 and merges == (1 if "before" in point else 0)
    return _trial("merge commit kill", rerun.exit_code if ok else -1, a, _redone(layout, before),
                  0, point=point, merges_after_kill=merges, killed=killed.returncode)


def table_worker_kill(work: Path, rows: int, seed: int) -> Trial:
    """A Lance input into an Iceberg output, a worker SIGKILLed mid-shard."""
    import lance

    rng = random.Random(seed)
    source = str(work / "source.lance")
    lance.write_dataset(_rows(0, rows, seed), source, max_rows_per_file=max(1, rows // 3))
    lance.dataset(source).delete(f"id < {rows // 20}")
    catalog = {"type": "sql", "uri": f"sqlite:///{work}/catalog.db",
               "warehouse": f"file://{work}/warehouse"}
    job = table_job({"uri": source, "format": "lance"}, str(work / "out"), format="iceberg",
                    table="chaos.scores", catalog=catalog, mode="incremental")
    point = rng.choice(["worker.infer", "worker.after_part"])
    os.environ["PIPELINE_FAULTS"] = json.dumps(
        [{"point": "worker.start", "action": "sleep", "seconds": 0.05},
         {"point": point, "action": "kill", "once_file": str(work / "killed")}])
    try:
        result = pipeline.run_job(job, progress=False)
    finally:
        del os.environ["PIPELINE_FAULTS"]
    layout = OutputLayout(str(work / "out"))
    redone = sum(1 for s in layout.committed_shards() if layout.read_marker(s).attempt > 1)
    a = audit_table(result.read(), lance.dataset(source).to_table())
    ok = (work / "killed").exists()
    return _trial("table worker kill", result.exit_code if ok else -1, a, redone, IN_FLIGHT,
                  point=point, deaths=result.report["attempts"]["actor_deaths"])


def second_writer(work: Path, rows: int, seed: int) -> Trial:
    """Another writer appends to the output table (Delta or Iceberg) while the job is about
    to commit: the job's commit retries on the new state; neither writer's rows are lost."""
    from deltalake import DeltaTable, write_deltalake
    from pyiceberg.catalog import load_catalog

    fmt = ["delta", "iceberg"][seed % 2]
    source, out = str(work / "source"), str(work / "out")
    write_delta_input(source, rows, seed)
    catalog = {"type": "sql", "uri": f"sqlite:///{work}/catalog.db",
               "warehouse": f"file://{work}/warehouse"}
    extra = {"table": "chaos.scores", "catalog": catalog} if fmt == "iceberg" else {}
    job = table_job({"uri": source, "format": "delta"}, out, format=fmt, mode="incremental",
                    **extra)
    first = pipeline.run_job(job, progress=False)  # the table exists from here on
    write_deltalake(source, _rows(rows + 1000, 30, seed + 5), mode="append")
    foreign = pa.table({"id": pa.array([-1, -2], pa.int64()), "label": pa.array([0, 1]),
                        "score": pa.array([0.5, 0.5]),
                        "probabilities": pa.array([[0.5, 0.5], [0.5, 0.5]])})
    manifest = work / "out" / "_pipeline" / manifest_name(2)
    wrote: dict[str, bool] = {}

    def other_writer() -> None:  # commits while the job sleeps before its own commit
        deadline = time.monotonic() + 120
        while not (manifest.exists() and '"committing"' in manifest.read_text()):
            if time.monotonic() > deadline:
                return  # the trial fails: the other writer never wrote
            time.sleep(0.05)
        if fmt == "delta":
            write_deltalake(out, foreign.cast(pa.schema(DeltaTable(out).schema().to_arrow())),
                            mode="append")
        else:
            table = load_catalog("default", **catalog).load_table("chaos.scores")
            table.append(foreign.cast(table.schema().as_arrow()))
        wrote["done"] = True

    result = run_beside(job, other_writer,
                        {"point": "driver.before_table_commit", "action": "sleep", "seconds": 3})
    table = result.read()
    ids = set(table["id"].to_pylist())
    mine = table.filter(pa.compute.greater_equal(table["id"], 0))
    a = audit_table(mine, pa.table(DeltaTable(source).to_pyarrow_table()))
    ok = first.ok and wrote.get("done", False)
    return _trial("second writer", result.exit_code if ok else -1, a, 0, 0, format=fmt,
                  foreign_kept={-1, -2} <= ids)


def input_moves_on(work: Path, rows: int, seed: int) -> Trial:
    """The input table gets appends and a delete (rewriting a file) while the job runs: the
    job writes exactly the version it planned."""
    from deltalake import DeltaTable, write_deltalake

    source, out = str(work / "source"), str(work / "out")
    write_delta_input(source, rows, seed)
    planned = DeltaTable(source)
    live = pa.table(planned.to_pyarrow_table())
    job = table_job({"uri": source, "format": "delta"}, out)
    markers = work / "out" / "_pipeline" / "shards"
    moved: dict[str, bool] = {}

    def mover() -> None:  # once the first shard is committed, the table moves on
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(markers.glob("*.json")):
            time.sleep(0.02)
        write_deltalake(source, _rows(rows + 1000, 25, seed + 1), mode="append")
        DeltaTable(source).delete(f"id < {rows // 4}")
        moved["at"] = True

    result = run_beside(job, mover, {"point": "worker.start", "action": "sleep", "seconds": 0.4})
    read = result.report["run"]["input_table"]["version"]
    a = audit_table(result.read(), live)
    ok = moved.get("at", False) and read == planned.version() and \
        DeltaTable(source).version() > read
    return _trial("input moves on", result.exit_code if ok else -1, a, 0, 0,
                  version_read=read, moved_during_job=moved.get("at", False))


TRIALS = {"merge_commit_kill": merge_commit_kill, "table_worker_kill": table_worker_kill,
          "second_writer": second_writer, "input_moves_on": input_moves_on}

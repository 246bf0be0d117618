"""Fault trials shared by the pytest suite (small) and `make chaos` (more trials, larger).

Every trial runs a real job, injects one fault, and measures against the input:
rows lost, rows duplicated, shards recomputed (and the bound: those in flight at the
fault), and whether report.json agrees with the files on storage.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import pipeline
from pipeline.demo.tabular import make_scoring_table
from pipeline.isolation import root_of, roots_done
from pipeline.job import execute
from pipeline.job_file import load_spec
from pipeline.layout import OutputLayout
from pipeline.planning import plan_job
from pipeline.progress import Silent

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
REPLICAS = 2
IN_FLIGHT = 2


@dataclass
class Trial:
    fault: str
    exit_code: int
    expected_exit: int
    rows_lost: int
    rows_duplicated: int
    shards_recomputed: int
    recompute_bound: int
    report_consistent: bool
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return (self.exit_code == self.expected_exit and self.rows_lost == 0
                and self.rows_duplicated == 0 and self.report_consistent
                and self.shards_recomputed <= self.recompute_bound)


# --------------------------------------------------------------------------- data and jobs


def write_tabular_input(folder: Path, rows: int, files: int, seed: int,
                        row_group_size: int = 50) -> set[int]:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    ids: set[int] = set()
    for i in range(files):
        start = i * per
        table = make_scoring_table(max(0, min(per, rows - start)), seed=seed * 100 + i,
                                   start_id=start)
        pq.write_table(table, folder / f"part-{i:03d}.parquet", row_group_size=row_group_size)
        ids.update(table["id"].to_pylist())
    return ids


def tabular_job(input_uri: str, output_uri: str, options: dict | None = None, **extra) -> dict:
    job = {
        "name": "chaos",
        "input": {"uri": input_uri, "storage_options": options or {}},
        "model": {"uri": str(MODELS / "breast_cancer")},
        "task": {"kind": "classify"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 50},
        "workers": {"cpu": {"replicas": REPLICAS}, "max_in_flight": IN_FLIGHT},
        "retry": {"max_attempts": 4, "backoff_s": 0.05, "max_backoff_s": 0.5},
        "output": {"uri": output_uri, "storage_options": options or {}},
    }
    job.update(extra)
    return job


# --------------------------------------------------------------------------- measuring


def audit(output_uri: str, input_ids: set[int], options: dict | None = None,
          excluded_ids: set[int] | None = None) -> dict[str, Any]:
    """Compare committed output and dead letters with the input ids."""
    layout = OutputLayout(output_uri, options)
    committed = layout.committed_shards()
    out_ids: list[int] = []
    dead_ids: list[int] = []
    markers = {}
    for sid in committed:
        markers[sid] = layout.read_marker(sid)
        with layout.fs.open(layout.part_path(sid), "rb") as fh:
            out_ids += pq.read_table(fh, columns=["id"])["id"].to_pylist()
        if markers[sid]["rows_bad"]:
            with layout.fs.open(layout.dead_letter_path(sid), "rb") as fh:
                dead_ids += pq.read_table(fh, columns=["id"])["id"].to_pylist()
    expected = input_ids - set(dead_ids) - (excluded_ids or set())
    counts = Counter(out_ids + dead_ids)
    try:
        with layout.fs.open(layout._path("_pipeline", "report.json"), "rb") as fh:
            report = json.loads(fh.read())
    except FileNotFoundError:
        report = None
    # Shards cut to isolate poison rows commit as pieces: a root counts once all are in.
    roots = roots_done({root_of(sid) for sid in committed}, committed)
    consistent = report is not None and (
        report["totals"]["committed"] == len(roots)
        and report["totals"]["rows_out"] == len(out_ids)
        and report["totals"]["rows_bad"] == len(dead_ids)
        and sum(report["bad_rows"]["by_reason"].values()) == len(dead_ids)
    )
    return {
        "lost": len(expected - set(out_ids)),
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "recomputed": sum(1 for m in markers.values() if m["attempt"] > 1),
        "consistent": consistent,
        "report": report,
        "markers": markers,
        "dead_ids": set(dead_ids),
    }


def _trial(fault: str, exit_code: int, expected: int, a: dict, bound: int, **details) -> Trial:
    return Trial(fault, exit_code, expected, a["lost"], a["duplicated"], a["recomputed"], bound,
                 a["consistent"], details)


# --------------------------------------------------------------------------- faults


def worker_kill(work: Path, rows: int, seed: int) -> Trial:
    """(a) SIGKILL of a worker process mid-shard (while inferring, or after the part file)."""
    rng = random.Random(seed)
    ids = write_tabular_input(work / "in", rows, 3, seed)
    point = rng.choice(["worker.infer", "worker.after_part"])
    faults = [{"point": "worker.start", "action": "sleep", "seconds": 0.05},
              {"point": point, "action": "kill", "once_file": str(work / "killed")}]
    os.environ["PIPELINE_FAULTS"] = json.dumps(faults)
    try:
        result = pipeline.run_job(tabular_job(str(work / "in"), str(work / "out")), progress=False)
    finally:
        del os.environ["PIPELINE_FAULTS"]
    a = audit(str(work / "out"), ids)
    return _trial("worker SIGKILL", result.exit_code, 0, a, IN_FLIGHT, point=point,
                  fired=(work / "killed").exists(),
                  deaths=result.report["attempts"]["actor_deaths"])


def s3_faults(work: Path, rows: int, seed: int, s3_url: str, options: dict,
              fault_rate: float = 0.1) -> Trial:
    """(d) the S3 endpoint answering 503 SlowDown or resetting connections."""
    import s3fs

    from tests.support.s3_fault_proxy import FaultProxy

    fs = s3fs.S3FileSystem(**options)
    bucket = f"chaos-{seed}-{int(time.time() * 1000) % 10**8}"
    fs.mkdir(bucket)
    local = work / "in"
    ids = write_tabular_input(local, rows, 3, seed)
    fs.put(str(local) + "/", f"{bucket}/in/", recursive=True)
    with FaultProxy(s3_url, fault_rate=fault_rate, seed=seed) as proxy:
        # Few retries inside botocore, so faults reach the pipeline's own retries.
        flaky = {**options, "client_kwargs": {"endpoint_url": proxy.url},
                 "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
        result = pipeline.run_job(tabular_job(f"s3://{bucket}/in", f"s3://{bucket}/out", flaky),
                                  progress=False)
        counts = dict(proxy.counts)
    a = audit(f"s3://{bucket}/out", ids, options)
    # A shard may be retried once per injected fault that reached us past botocore's retries.
    return _trial("S3 503/reset", result.exit_code, 0, a, len(a["markers"]), proxy=counts)


def corrupt_file(work: Path, rows: int, seed: int) -> Trial:
    """(e) a truncated Parquet file among good ones: its shard fails, everything else commits."""
    ids = write_tabular_input(work / "in", rows, 3, seed)
    bad = work / "in" / "part-001.parquet"
    bad_ids = set(pq.read_table(bad, columns=["id"])["id"].to_pylist())
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = pipeline.run_job(tabular_job(str(work / "in"), str(work / "out")), progress=False)
    a = audit(str(work / "out"), ids, excluded_ids=bad_ids)
    failed_inputs = {f["input"].rsplit("/", 1)[-1] for f in result.report["failures"]}
    return _trial("corrupt parquet", result.exit_code, 1, a, 0,
                  failed_inputs=sorted(failed_inputs), success=(work / "out" / "_SUCCESS").exists())


def deleted_file(work: Path, rows: int, seed: int) -> Trial:
    """(f) an input file deleted between planning and reading."""
    ids = write_tabular_input(work / "in", rows, 3, seed)
    planned = plan_job(load_spec(tabular_job(str(work / "in"), str(work / "out"))))
    gone = work / "in" / "part-002.parquet"
    gone_ids = set(pq.read_table(gone, columns=["id"])["id"].to_pylist())
    gone.unlink()
    result = execute(planned, console=Silent())
    a = audit(str(work / "out"), ids, excluded_ids=gone_ids)
    errors = [f["last_error"] for f in result.report["failures"]]
    return _trial("input deleted", result.exit_code, 1, a, 0, errors=errors[:1],
                  failed=len(errors))


def bad_rows(work: Path, rows: int, seed: int) -> Trial:
    """(g) null, empty, wrongly typed and model-breaking rows go to the dead-letter files."""
    rng = random.Random(seed)
    from pipeline.demo.text import make_text_table

    texts = make_text_table(rows, seed=seed)["text"].to_pylist()
    kinds = {}
    for i in rng.sample(range(rows), max(4, rows // 20)):
        kinds[i] = rng.choice(["null", "empty", "blank"])
        texts[i] = {"null": None, "empty": "", "blank": "  \n "}[kinds[i]]
    folder = work / "in"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}),
                   folder / "docs.parquet", row_group_size=50)
    # A JSON Lines file whose text field holds numbers: wrongly typed rows.
    with open(folder / "numbers.jsonl", "w") as fh:
        for i in range(rows, rows + 5):
            fh.write(json.dumps({"id": i, "text": i * 7}) + "\n")
    ids = set(range(rows + 5))
    job = {
        "input": {"uri": str(folder)}, "model": {"uri": str(MODELS / "minilm")},
        "task": {"kind": "embed"}, "passthrough": ["id"], "sharding": {"rows_per_shard": 50},
        "workers": {"cpu": {"replicas": REPLICAS}}, "bad_rows": {"max_fraction": 0.5},
        "output": {"uri": str(work / "out")},
    }
    result = pipeline.run_job(job, progress=False)
    a = audit(str(work / "out"), ids)
    want_dead = set(kinds) | set(range(rows, rows + 5))
    reasons = result.report["bad_rows"]["by_reason"]
    # The same job with a strict budget: everything is written, but the job fails (exit 1).
    strict = pipeline.run_job({**job, "bad_rows": {"max_fraction": 0.001},
                               "output": {"uri": str(work / "strict")}}, progress=False)
    ok = a["dead_ids"] == want_dead and strict.exit_code == 1 and \
        not (work / "strict" / "_SUCCESS").exists()
    return _trial("bad rows", result.exit_code if ok else -1, 0, a, 0, reasons=reasons,
                  strict_exit=strict.exit_code)


def poison_rows(work: Path, rows: int, seed: int, action: str = "abort",
                rows_per_shard: int = 50) -> Trial:
    """(h) rows that kill the worker process (``abort``: SIGABRT, ``segv``) or run it out of
    memory (``oom``) on three different shards: isolated by splitting and dead-lettered."""
    rng = random.Random(seed)
    ids = write_tabular_input(work / "in", rows, 3, seed)
    per_file = -(-rows // 3)
    shards = [(start, min(start + rows_per_shard, (start // per_file + 1) * per_file))
              for f in range(3) for start in range(f * per_file, min(rows, (f + 1) * per_file),
                                                   rows_per_shard)]
    poison = {rng.randrange(a, b) for a, b in rng.sample(shards, 3)}
    os.environ["PIPELINE_FAULTS"] = json.dumps(
        [{"point": "worker.rows", "action": action, "values": sorted(poison)}])
    job = tabular_job(str(work / "in"), str(work / "out"),
                      sharding={"rows_per_shard": rows_per_shard})
    try:
        result = pipeline.run_job(job, progress=False)
    finally:
        del os.environ["PIPELINE_FAULTS"]
    a = audit(str(work / "out"), ids)
    isolated = result.report["isolation"] or {"rows": []}
    ok = a["dead_ids"] == poison and len(isolated["rows"]) == len(poison)
    deaths = result.report["attempts"]["actor_deaths"]
    fault = {"abort": "row aborts worker", "segv": "row segfaults worker",
             "oom": "row exhausts memory"}[action]
    return _trial(fault, result.exit_code if ok else -1, 0, a, deaths, poison=sorted(poison),
                  dead=sorted(a["dead_ids"]), deaths=deaths,
                  pieces=isolated.get("pieces", 0), reasons=result.report["bad_rows"]["by_reason"])


def two_drivers(work: Path, rows: int, seed: int) -> Trial:
    """(i) two drivers on one output: the second is refused while the first runs, then waits
    (``--wait``); the first is killed and the second takes over and finishes."""
    rng = random.Random(seed)
    ids = write_tabular_input(work / "in", rows, 3, seed)
    job_file = work / "job.yaml"
    job_file.write_text(yaml.safe_dump(tabular_job(str(work / "in"), str(work / "out"))))
    env = {**os.environ, "PIPELINE_FAULTS": json.dumps(
        [{"point": "worker.start", "action": "sleep", "seconds": 0.3}])}
    markers = work / "out" / "_pipeline" / "shards"
    first = _cli(job_file, env)
    deadline = time.monotonic() + 120
    while first.poll() is None and not list(markers.glob("*.json")) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    refused = subprocess.run([sys.executable, "-m", "pipeline.run", str(job_file),
                              "--no-progress"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    second = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(job_file),
                               "--no-progress", "--wait"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(rng.uniform(0.5, 2.0))
    first_alive = first.poll() is None
    if first_alive:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    out, _ = second.communicate(timeout=600)
    a = audit(str(work / "out"), ids)
    ok = refused.returncode == 2 and "held by another driver" in refused.stderr
    return _trial("two drivers", second.returncode if ok else -1, 0, a, REPLICAS * IN_FLIGHT,
                  refused=refused.returncode, killed_running=first_alive,
                  tail=out[-300:] if second.returncode else "")


# --------------------------------------------------------------------------- out-of-process faults


def _cli(job_file: Path, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", str(job_file), "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **kw)


def driver_kill(work: Path, rows: int, seed: int) -> Trial:
    """(c) SIGKILL of the driver (and the local Ray it started) at a random point, then rerun."""
    rng = random.Random(seed)
    ids = write_tabular_input(work / "in", rows, 3, seed)
    job = tabular_job(str(work / "in"), str(work / "out"))
    job_file = work / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PIPELINE_FAULTS": json.dumps(
        [{"point": "worker.start", "action": "sleep", "seconds": 0.3}])}
    env.pop("RAY_ADDRESS", None)
    shards = -(-rows // 50)
    # A random point: after k committed shards (k = 0: while planning or starting Ray).
    target = rng.randint(0, shards - 1)
    markers = work / "out" / "_pipeline" / "shards"
    proc = _cli(job_file, env)
    started = time.monotonic()
    while proc.poll() is None and len(list(markers.glob("*.json"))) < target:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    delay = time.monotonic() - started
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    layout = OutputLayout(str(work / "out"))
    before = {s: layout.read_marker(s)["committed_at"] for s in layout.committed_shards()}
    orphans = {p.name[5:-8] for p in (work / "out").glob("part-*.parquet")} - set(before)
    env.pop("PIPELINE_FAULTS")
    rerun = _cli(job_file, env)
    out, _ = rerun.communicate(timeout=600)
    a = audit(str(work / "out"), ids)
    after = {s: layout.read_marker(s)["committed_at"] for s in before}
    redone = sum(1 for s in before if after[s] != before[s])
    # Work lost at the kill: part files written without a marker, plus committed shards redone.
    a["recomputed"] = len(orphans) + redone
    return _trial("driver SIGKILL", rerun.returncode, 0, a, REPLICAS * IN_FLIGHT,
                  killed_after_s=round(delay, 1), target=target, committed_before=len(before),
                  orphan_parts=len(orphans),
                  tail=out.decode()[-300:] if rerun.returncode else "")


NODE_LOSS_SCRIPT = r'''
import json, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
import pipeline

job = json.loads(sys.argv[1])
out = Path(job["output"]["uri"])
config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
          "health_check_failure_threshold": 3}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": config})
nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
removed = {}
def remove_when_running():
    deadline = time.time() + 120
    while time.time() < deadline and not removed:
        if len(list((out / "_pipeline" / "shards").glob("*.json"))) >= 2:
            cluster.remove_node(nodes[0])
            removed["at"] = time.time()
        time.sleep(0.05)
threading.Thread(target=remove_when_running, daemon=True).start()
try:
    result = pipeline.run_job(job, progress=False)
    print("RESULT " + json.dumps({"exit_code": result.exit_code, "removed": bool(removed),
                                  "deaths": result.report["attempts"]["actor_deaths"]}))
finally:  # also on errors: a cluster left behind is what a later ray.init() connects to
    ray.shutdown()
    cluster.shutdown()
'''


def node_loss(work: Path, rows: int, seed: int) -> Trial:
    """(b) a Ray node removed mid-job (ray.cluster_utils.Cluster: head + 2 worker nodes)."""
    ids = write_tabular_input(work / "in", rows, 3, seed)
    # All nodes of this test cluster run on one machine, so its disk is a shared filesystem.
    job = tabular_job(str(work / "in"), str(work / "out"), storage={"shared_filesystem": True})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PIPELINE_FAULTS": json.dumps(
        [{"point": "worker.start", "action": "sleep", "seconds": 0.2}])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS_SCRIPT, json.dumps(job)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    info = json.loads(line[7:]) if line else {"exit_code": -1, "removed": False, "deaths": 0}
    a = audit(str(work / "out"), ids)
    exit_code = info["exit_code"] if info["removed"] else -2  # the fault must have happened
    return _trial("node removed", exit_code, 0, a, IN_FLIGHT * 1, deaths=info["deaths"],
                  stderr=proc.stderr[-300:] if not line else "")


def summarize(trials: list[Trial]) -> str:
    rows = ["| fault | trials | completed | rows lost | rows duplicated | poison rows "
            "dead-lettered | shards recomputed (max allowed) |", "|---|---|---|---|---|---|---|"]
    for fault in dict.fromkeys(t.fault for t in trials):
        group = [t for t in trials if t.fault == fault]
        poison = sum(len(t.details.get("poison", [])) for t in group)
        dead = sum(len(set(t.details.get("dead", [])) & set(t.details.get("poison", [])))
                   for t in group)
        rows.append(
            f"| {fault} | {len(group)} | {sum(t.completed for t in group)} | "
            f"{sum(t.rows_lost for t in group)} | {sum(t.rows_duplicated for t in group)} | "
            f"{f'{dead} of {poison}' if poison else '-'} | "
            f"{sum(t.shards_recomputed for t in group)} "
            f"({sum(t.recompute_bound for t in group)}) |")
    return "\n".join(rows)


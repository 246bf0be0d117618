"""Planning at scale: dry-run time, driver peak memory and driver CPU per shard, for 1k, 10k
and 100k small Parquet files on a local S3 endpoint (moto's server).

    python -m benchmarks.scale [--files 1000 10000 100000]      (make bench-scale)

Each size plans in a fresh process (`plan_job`, as `--dry-run` does: listing, the footers a
split needs, shards), which reports its wall time and peak RSS. Driver CPU per shard is the
scheduler's work for one shard (assign, succeed) on that many shards with 16 workers. The
ratios are against the smallest size, measured in the same run; the target is that 10x the
files costs at most 3x the planning time.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.demo.tabular import make_scoring_table

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "bench", "bench-secret"

PLAN = r"""
import json, resource, sys, time
from pipeline.planning import plan_job
from pipeline.job_file import load_spec
job = json.loads(sys.argv[1])
import s3fs
started = time.perf_counter()
s3fs.S3FileSystem().find(job["input"]["uri"])  # the listing alone: the store's floor
listing = time.perf_counter() - started
s3fs.S3FileSystem.clear_instance_cache()
started = time.perf_counter()
planned = plan_job(load_spec(job))
wall = time.perf_counter() - started
print("RESULT " + json.dumps({"plan_s": wall, "list_s": listing, "shards": len(planned.plan.shards),
                              "files": len(planned.plan.files),
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def start_moto() -> tuple[subprocess.Popen, str]:
    from tests.support.fixtures import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url)
    return proc, url


def upload(fs, bucket: str, count: int) -> float:
    """``count`` small Parquet files of 16 rows each (one file's bytes, many keys)."""
    buffer = io.BytesIO()
    pq.write_table(make_scoring_table(16, seed=1), buffer)
    data = buffer.getvalue()
    started = time.perf_counter()
    for start in range(0, count, 2000):  # batches: s3fs sends each batch concurrently
        fs.pipe({f"{bucket}/in/f{i:07d}.parquet": data for i in range(start, min(count, start + 2000))})
    return time.perf_counter() - started


def plan_once(job: dict, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PLAN, json.dumps(job)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(line[7:])


def scheduler_cpu_per_shard(shards: int, workers: int = 16) -> float:
    from pipeline.scheduler import RetryPolicy, Scheduler

    sched = Scheduler([f"s{i}" for i in range(shards)], RetryPolicy(), max_in_flight=2)
    for w in range(workers):
        sched.add_worker(f"w{w}")
    started = time.process_time()
    while not sched.finished():
        for worker, sid, _ in sched.assignments():
            sched.succeeded(worker, sid)
    return (time.process_time() - started) / shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--rows-per-shard", type=int, default=10000)
    args = parser.parse_args(argv)

    import s3fs

    moto, url = start_moto()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1"}
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": url}}
    fs = s3fs.S3FileSystem(**options)
    rows = []
    try:
        for count in sorted(args.files):
            bucket = f"scale-{count}"
            fs.mkdir(bucket)
            upload_s = upload(fs, bucket, count)
            job = {"input": {"uri": f"s3://{bucket}/in/"},
                   "model": {"uri": str(REPO / "models" / "breast_cancer")},
                   "task": {"kind": "classify"}, "passthrough": ["id"],
                   "sharding": {"rows_per_shard": args.rows_per_shard},
                   "output": {"uri": f"s3://{bucket}/out/"}}
            result = plan_once(job, env)
            result.update(files=count, upload_s=upload_s,
                          cpu_us_per_shard=scheduler_cpu_per_shard(max(count, 1)) * 1e6)
            rows.append(result)
            print(f"{count:>7} files: planned {result['shards']} shards in {result['plan_s']:.2f} s "
                  f"(a bare listing takes {result['list_s']:.2f} s), "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB, scheduler "
                  f"{result['cpu_us_per_shard']:.1f} us/shard (upload {upload_s:.0f} s)", flush=True)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    base = rows[0]
    print("\n| files | shards | dry run (s) | ratio | bare listing (s) | planning beyond the "
          "listing (s) | driver peak RSS (MB) | scheduler CPU per shard (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['files']:,} | {r['shards']:,} | {r['plan_s']:.2f} | "
              f"{r['plan_s'] / base['plan_s']:.1f}x | {r['list_s']:.2f} | "
              f"{max(0.0, r['plan_s'] - r['list_s']):.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['cpu_us_per_shard']:.1f} |")
    for small, big in itertools.pairwise(rows):
        ratio = big["plan_s"] / small["plan_s"]
        files = big["files"] / small["files"]
        print(f"{files:.0f}x the files: {ratio:.1f}x the planning time "
              f"({'within' if ratio <= 3 else 'OVER'} the 3x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

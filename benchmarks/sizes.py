"""Data of awkward sizes, each against a baseline measured in the same run.

    python -m benchmarks.sizes memory [--rows 1000000]         (make bench-memory)
    python -m benchmarks.sizes small-files [--rows 8000]        (make bench-small-files)

memory: one Parquet file whose single row group holds all rows (tabular classifier, 30
features), at 1/4 of --rows and at --rows. Every worker takes row ranges of that one row
group; the figure is the highest actor peak RSS in the shard markers. Target: 4x the rows
within 1.3x the memory.

small-files: the same text rows (MiniLM embeddings) as 500 files of rows/500 rows and as 4
files; rows/s of the whole job and the number of part files. Target: at least 0.8x the speed
of 4 files, with at most a tenth as many part files as input files.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def run(job: dict) -> tuple[float, dict, list[dict]]:
    import pipeline

    started = time.perf_counter()
    result = pipeline.run_job(job, progress=False)
    wall = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"job failed: {result.report.get('failures')}")
    out = Path(result.output_uri.removeprefix("file://"))
    markers = [json.loads(p.read_text()) for p in (out / "_pipeline" / "shards").glob("*.json")]
    return wall, result.report, markers


def memory(rows: int, work: Path) -> None:
    from pipeline.demo.tabular import make_scoring_table

    figures = []
    shard_rows = max(1, rows // 16)  # the same shard size for both: only the row group grows
    for n in (rows // 4, rows):
        folder = work / f"rg-{n}"
        folder.mkdir()
        table = pa.concat_tables([make_scoring_table(min(100_000, n - s), seed=s, start_id=s)
                                  for s in range(0, n, 100_000)])
        pq.write_table(table, folder / "one.parquet", row_group_size=n)
        del table
        job = {"input": {"uri": str(folder)}, "model": {"uri": str(REPO / "models/breast_cancer")},
               "task": {"kind": "classify"}, "passthrough": ["id"],
               "sharding": {"rows_per_shard": shard_rows},
               "workers": {"cpu": {"replicas": 2}}, "output": {"uri": str(work / f"out-{n}")}}
        wall, report, markers = run(job)
        peak = max(m["peak_rss_mb"] for m in markers)
        groups = pq.ParquetFile(folder / "one.parquet").metadata.num_row_groups
        workers = len({m["worker"] for m in markers})
        figures.append((n, peak))
        print(f"{n:>9,} rows in {groups} row group: {len(markers)} shards on {workers} workers, "
              f"{report['totals']['rows_in'] / wall:,.0f} rows/s, actor peak RSS {peak:.0f} MB",
              flush=True)
    (small, small_peak), (big, big_peak) = figures
    ratio = big_peak / small_peak
    print(f"\n{big // small}x the rows in one row group: {ratio:.2f}x the actor peak memory "
          f"({'within' if ratio <= 1.3 else 'OVER'} the 1.3x target)")


def small_files(rows: int, work: Path) -> None:
    from pipeline.demo.text import make_text_table

    table = make_text_table(rows, seed=7)
    figures = {}
    for label, files in (("4 files", 4), ("500 files", 500)):
        folder = work / label.replace(" ", "-")
        folder.mkdir()
        per = -(-rows // files)
        for i in range(files):
            pq.write_table(table.slice(i * per, per), folder / f"part-{i:04d}.parquet")
        job = {"input": {"uri": str(folder)}, "model": {"uri": str(REPO / "models/minilm")},
               "task": {"kind": "embed"}, "passthrough": ["id"],
               "sharding": {"rows_per_shard": 2000}, "workers": {"cpu": {"replicas": 2}},
               "batching": {"max_tokens": 8192, "max_rows": 128},
               "output": {"uri": str(work / f"out-{files}")}}
        wall, _, markers = run(job)
        parts = len(list((work / f"out-{files}").glob("part-*.parquet")))
        figures[label] = rows / wall
        print(f"{label:>9}: {rows / wall:,.0f} rows/s, {len(markers)} shards, {parts} part files",
              flush=True)
    ratio = figures["500 files"] / figures["4 files"]
    print(f"\n500 small files run at {ratio:.2f}x the speed of 4 files "
          f"({'within' if ratio >= 0.8 else 'BELOW'} the 0.8x target)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["memory", "small-files"])
    parser.add_argument("--rows", type=int)
    args = parser.parse_args(argv)
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp:
        if args.which == "memory":
            memory(args.rows or 1_000_000, Path(tmp))
        else:
            small_files(args.rows or 8000, Path(tmp))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

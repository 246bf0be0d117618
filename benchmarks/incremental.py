"""What a nightly incremental run costs against recomputing the whole corpus, in one run.

    python -m benchmarks.incremental [--rows 20000] [--files 10] [--format parquet]

Writes ``--files`` Parquet files of demo texts, runs the embed job once in incremental mode
(night 1), then grows the input the way a bucket grows overnight: one new file, one changed
file, one deleted file (each 1/``--files`` of the corpus). Night 2 is timed twice over that
input: as an incremental run over night 1's output, and from scratch (``--fresh``) into a new
output, the baseline. Each run is ``python -m pipeline.run`` in its own process, start-up
included. Prints rows computed and wall time of each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.demo.text import make_text_table

REPO = Path(__file__).resolve().parents[1]


def write_file(folder: Path, index: int, rows: int, seed: int) -> None:
    table = make_text_table(rows, seed=seed)
    ids = [index * 1_000_000 + i for i in range(rows)]
    table = table.set_column(table.schema.get_field_index("id"), "id", [ids]) \
        if "id" in table.column_names else table.append_column("id", [ids])
    pq.write_table(table, folder / f"docs-{index:03d}.parquet", row_group_size=1000)


def run(job: Path, *extra: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", str(job), "--no-progress",
                           *extra], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"pipeline.run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 1), "stdout": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--format", default="parquet", choices=["parquet", "delta", "lance"])
    args = parser.parse_args()
    per = args.rows // args.files
    with tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp:
        root = Path(tmp)
        data = root / "in"
        data.mkdir()
        for i in range(args.files):
            write_file(data, i, per, seed=i)
        jobs = {}
        for name in ("incremental", "scratch"):
            spec = {
                "name": f"bench-{name}", "input": {"uri": str(data)},
                "model": {"uri": str(REPO / "models" / "minilm")},
                "task": {"kind": "embed", "text_column": "text"}, "passthrough": ["id"],
                "sharding": {"rows_per_shard": 1000},
                "output": {"uri": str(root / name), "mode": "incremental",
                           "format": args.format},
            }
            jobs[name] = root / f"{name}.json"
            jobs[name].write_text(json.dumps(spec))
        night1 = run(jobs["incremental"])
        # Overnight: one new file, one changed, one deleted.
        write_file(data, args.files, per, seed=1000)
        write_file(data, 0, per, seed=2000)
        (data / f"docs-{args.files - 1:03d}.parquet").unlink()
        incremental = run(jobs["incremental"])
        scratch = run(jobs["scratch"], "--fresh")
        report = json.loads((root / "incremental" / "_pipeline" / "report.json").read_text())
    run2 = report["run"]
    print(f"corpus {args.rows:,} rows in {args.files} files, {args.format} output; night 2: "
          "+1 new file, 1 changed, 1 deleted")
    print(f"night 1 (everything):          {night1['wall_s']:7.1f} s")
    print(f"night 2 incremental:           {incremental['wall_s']:7.1f} s "
          f"({run2['rows']['added']:,} rows computed, {run2['shards']['kept']} shards kept, "
          f"{len(run2['shards']['replaced'])} replaced, {len(run2['shards']['retired'])} "
          "retired)")
    print(f"night 2 from scratch (--fresh): {scratch['wall_s']:7.1f} s "
          f"({args.rows:,} rows computed)")
    print(f"incremental / from scratch:     {incremental['wall_s'] / scratch['wall_s']:.2f}x "
          "the wall time")


if __name__ == "__main__":
    main()

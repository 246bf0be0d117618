"""Jobs as tests run them: small tabular inputs, the job around them, running it the way a
user does (in-process or as its own driver process), and reading what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline.demo.tabular import make_scoring_table
from pipeline.layout import OutputLayout
from pipeline.state import ShardMarker

REPO = Path(__file__).resolve().parents[2]
OUTPUT_COLUMNS = ["id", "label", "score"]  # what a tabular classify job writes (passthrough id)


def write_scoring_file(folder: Path, name: str, rows: int, seed: int, start_id: int) -> None:
    """A Parquet file of the breast-cancer demo features, in row groups of 40."""
    folder.mkdir(parents=True, exist_ok=True)
    table = make_scoring_table(rows, seed=seed, start_id=start_id)
    path = folder / name
    pq.write_table(table, path, row_group_size=40)
    # Local versions are size + mtime: make a rewrite visible even within one second.
    stamp = 1_700_000_000 + seed
    os.utime(path, (stamp, stamp))


def tabular_job(models_dir: Path, input_dir: Path, output: Path, **output_extra) -> dict:
    """An incremental classify job over ``input_dir``: shards of 40 rows, two workers."""
    return {
        "name": "incremental",
        "input": {"uri": str(input_dir)},
        "model": {"uri": str(models_dir / "breast_cancer")},
        "task": {"kind": "classify"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": 40},
        "workers": {"cpu": {"replicas": 2, "cpus": 1}},
        "output": {"uri": str(output), "mode": "incremental", **output_extra},
    }


def rows_of(table: pa.Table) -> list[tuple]:
    """The output's rows, sorted: compares outputs whatever their shard order."""
    return sorted(zip(*(table[c].to_pylist() for c in OUTPUT_COLUMNS), strict=True))


def from_scratch(models_dir: Path, input_dir: Path, out: Path | None = None) -> list[tuple]:
    """The rows a fresh run over ``input_dir`` writes (what every incremental run must equal):
    every file's rows scored in this process by ``pipeline.score`` (a fresh job gives the same,
    as tests of jobs against score show, at a few seconds of worker start per call)."""
    files = sorted(p for p in input_dir.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in files])
    scored = pipeline.score(table, model=str(models_dir / "breast_cancer"),
                            task={"kind": "classify"}, passthrough=["id"])
    return rows_of(scored)


def markers(output: Path | str, storage_options: dict | None = None) -> dict[str, ShardMarker]:
    """Every committed shard's marker, by shard id."""
    layout = OutputLayout(str(output), storage_options)
    return {sid: layout.read_marker(sid) for sid in layout.committed_shards()}


def run_driver(spec: dict, tmp_path: Path, faults: list[dict]) -> subprocess.CompletedProcess:
    """The job as a user runs it (``python -m pipeline.run``), in its own driver process on the
    test session's cluster, with ``faults`` injected."""
    import ray

    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PIPELINE_FAULTS": json.dumps(faults)}
    return subprocess.run([sys.executable, "-m", "pipeline.run", str(path), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

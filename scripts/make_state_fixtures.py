"""Write the state files of the current FORMAT_VERSION as test fixtures (dev-only).

    .venv/bin/python scripts/make_state_fixtures.py [--out tests/fixtures/state/v<N>]

Real jobs on a local Ray cluster (``make models`` first): an incremental tabular job with a
bad row and a transient fault (markers, two run manifests, a report with a retried shard),
a job whose shard fails (a report with failures), and a Lance job (a marker with fragments).
Run it when ``state.FORMAT_VERSION`` changes and commit the new folder next to the old ones:
tests/unit/test_state_files.py reads every version's files, so old outputs keep reading.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo.tabular import make_scoring_table
from pipeline.demo.text import make_text_table
from pipeline.job import execute
from pipeline.job_file import load_spec
from pipeline.planning import plan_job
from pipeline.progress import Silent
from pipeline.state import FORMAT_VERSION

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=40)


def run(spec: dict, faults: list[dict] | None = None) -> int:
    if faults:
        os.environ["PIPELINE_FAULTS"] = json.dumps(faults)
    try:
        return execute(plan_job(load_spec(spec)), console=Silent()).exit_code
    finally:
        os.environ.pop("PIPELINE_FAULTS", None)


def tabular(work: Path, out: Path) -> None:
    """Incremental runs with a bad row, a retried shard, a changed and a new file."""
    rows = make_scoring_table(120, seed=5).to_pylist()
    rows[3]["mean_radius"] = None
    table = pa.Table.from_pylist(rows)
    write(work / "in" / "a.parquet", table.slice(0, 60))
    write(work / "in" / "b.parquet", table.slice(60))
    spec = {"name": "fixture-tabular", "input": {"uri": str(work / "in")},
            "model": {"uri": str(MODELS / "breast_cancer")}, "task": {"kind": "classify"},
            "passthrough": ["id"], "sharding": {"rows_per_shard": 40},
            "workers": {"cpu": {"replicas": 1}}, "retry": {"backoff_s": 0.1},
            "bad_rows": {"max_fraction": 0.5},
            "output": {"uri": str(work / "out"), "mode": "incremental"}}
    once = str(work / "once")
    assert run(spec, [{"point": "worker.start", "action": "transient", "attempt": 1,
                       "once_file": once}]) == 0
    state = work / "out" / "_pipeline"
    shutil.copy(state / "report.json", out / "report-retried.json")
    write(work / "in" / "b.parquet", table.slice(60, 30))
    write(work / "in" / "c.parquet", table.slice(90))
    assert run(spec) == 0
    for name in ("report.json", "job.json"):
        shutil.copy(state / name, out / name)
    for manifest in sorted((state / "runs").glob("*.json")):
        shutil.copy(manifest, out / f"run-{manifest.name}")
    markers = sorted((state / "shards").glob("*.json"))
    bad = [m for m in markers if json.loads(m.read_text())["rows_bad"]]
    shutil.copy((bad or markers)[0], out / "marker.json")
    retried = [m for m in markers if json.loads(m.read_text())["attempt"] > 1]
    shutil.copy((retried or markers)[0], out / "marker-retried.json")

    failing = {**spec, "name": "fixture-failed", "output": {"uri": str(work / "fout")},
               "retry": {"max_attempts": 2, "backoff_s": 0.05}}
    first = plan_job(load_spec(failing)).plan.shards[0].id
    assert run(failing, [{"point": "worker.start", "action": "raise", "shard": first[:8]}]) == 1
    shutil.copy(work / "fout" / "_pipeline" / "report.json", out / "report-failed.json")


def lance(work: Path, out: Path) -> None:
    """A Lance output: its markers record the fragments each shard wrote."""
    write(work / "tin" / "t.parquet", make_text_table(30, seed=2).select(["id", "text"]))
    spec = {"name": "fixture-lance", "input": {"uri": str(work / "tin")},
            "model": {"uri": str(MODELS / "minilm")}, "task": {"kind": "embed"},
            "passthrough": ["id"], "workers": {"cpu": {"replicas": 1}},
            "output": {"uri": str(work / "lout"), "format": "lance"}}
    assert run(spec) == 0
    state = work / "lout" / "_pipeline"
    shutil.copy(next((state / "shards").glob("*.json")), out / "marker.json")
    shutil.copy(state / "report.json", out / "report.json")
    shutil.copy(state / "runs" / "000001.json", out / "run-000001.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path,
                        default=REPO / "tests" / "fixtures" / "state" / f"v{FORMAT_VERSION}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="state-fixtures-") as folder:
        for name, make in (("parquet", tabular), ("lance", lance)):
            target = args.out / name
            target.mkdir(parents=True, exist_ok=True)
            make(Path(folder) / name, target)
            print(f"wrote {sorted(p.name for p in target.iterdir())} to {target}")


if __name__ == "__main__":
    main()

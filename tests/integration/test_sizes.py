"""Data of any size and shape on a real Ray cluster: huge row groups shared by all workers,
tiny files packed together, text files split by bytes, saved footers reused on resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import listing
from pipeline.demo.tabular import make_scoring_table
from tests.reliability.harness import tabular_job
from tests.support.jobs import markers

pytestmark = pytest.mark.usefixtures("ray_cluster")


def output_ids(out: Path) -> list[int]:
    return sorted(i for m in markers(out).values()
                  for i in pq.read_table(out / m["part"], columns=["id"])["id"].to_pylist())


def test_one_huge_row_group_is_shared_by_every_worker(tmp_path):
    table = make_scoring_table(3000, seed=1)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "one.parquet", row_group_size=3000)
    job = tabular_job(str(tmp_path / "in"), str(tmp_path / "out"),
                      sharding={"rows_per_shard": 500}, batching={"window_rows": 256})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    found = list(markers(tmp_path / "out").values())
    assert len(found) == 6 and {m["rows_in"] for m in found} == {500}
    assert len({m["worker"] for m in found}) == 2  # both workers took part of one row group
    assert all(m["peak_rss_mb"] > 0 for m in found)
    assert output_ids(tmp_path / "out") == sorted(table["id"].to_pylist())


def test_tiny_files_are_packed_into_few_shards(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    ids = []
    for i in range(120):
        part = make_scoring_table(8, seed=i, start_id=i * 8)
        pq.write_table(part, folder / f"tiny-{i:04d}.parquet")
        ids += part["id"].to_pylist()
    job = tabular_job(str(folder), str(tmp_path / "out"), sharding={"rows_per_shard": 400})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    parts = list((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) <= 12  # at most a tenth as many part files as input files
    assert max(m.files for m in markers(tmp_path / "out").values()) > 1
    assert output_ids(tmp_path / "out") == sorted(ids)


def test_csv_and_json_lines_split_by_byte_ranges(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    table = make_scoring_table(1500, seed=4)
    pacsv.write_csv(table.slice(0, 900), folder / "a.csv")
    with open(folder / "b.jsonl", "w") as fh:
        for row in table.slice(900).to_pylist():
            fh.write(json.dumps(row) + "\n")
    job = tabular_job(str(folder), str(tmp_path / "out"),
                      sharding={"rows_per_shard": 200, "bytes_per_shard": 40_000})
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0
    found = list(markers(tmp_path / "out").values())
    pieces = [p for m in found for p in m["pieces"]]
    assert {p[2] for p in pieces} == {"bytes"} and len(found) > 4
    assert output_ids(tmp_path / "out") == sorted(table["id"].to_pylist())


def test_resume_reuses_saved_footers_and_notices_a_replaced_file(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        pq.write_table(make_scoring_table(300, seed=i, start_id=i * 300), folder / f"f{i}.parquet",
                       row_group_size=100)
    job = tabular_job(str(folder), str(tmp_path / "out"), sharding={"rows_per_shard": 100})
    assert pipeline.run_job(job, progress=False).exit_code == 0
    saved = json.loads((tmp_path / "out" / "_pipeline" / "plan.json").read_text())
    assert len(saved["files"]) == 3 and all(f["row_group_rows"] for f in saved["files"])

    reads: list[str] = []
    original = listing._inspect
    monkeypatch.setattr(listing, "_inspect", lambda f, *a: (reads.append(f.uri), original(f, *a)))
    again = pipeline.run_job(job, progress=False)
    assert again.exit_code == 0 and again.report["totals"]["run_now"] == 0
    assert reads == []  # every footer came from plan.json

    # Same size, other content: the modification time gives it away.
    path = folder / "f1.parquet"
    size = path.stat().st_size
    replaced = make_scoring_table(300, seed=99, start_id=300)
    pq.write_table(replaced, path, row_group_size=100)
    data = path.read_bytes()[:size].ljust(size, b"\0")
    path.write_bytes(data)
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert path.stat().st_size == size
    from pipeline.run import main

    assert main([_write(tmp_path, job), "--no-progress"]) == 2


def test_the_same_input_gives_the_same_shards_on_every_run(tmp_path):
    # Files of many sizes: some packed, some split. Footers the first run saved must not move
    # the byte targets of the second (it would cut other shards and refuse to resume).
    folder = tmp_path / "in"
    folder.mkdir()
    start = 0
    for i, rows in enumerate([5, 400, 17, 900, 3, 250, 60, 1200, 8, 33] * 3):
        pq.write_table(make_scoring_table(rows, seed=i, start_id=start),
                       folder / f"f{i:02d}.parquet", row_group_size=100)
        start += rows
    job = tabular_job(str(folder), str(tmp_path / "out"), sharding={"rows_per_shard": 300})
    first = pipeline.run_job(job, progress=False)
    assert first.exit_code == 0
    again = pipeline.run_job(job, progress=False)
    assert again.exit_code == 0
    assert again.report["totals"]["run_now"] == 0
    assert again.report["totals"]["resumed"] == first.report["totals"]["shards"]
    assert output_ids(tmp_path / "out") == list(range(start))


def test_empty_text_files_among_others_give_no_rows(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    table = make_scoring_table(40, seed=3)
    pacsv.write_csv(table, folder / "a.csv")
    (folder / "b.csv").write_bytes(b"")
    (folder / "c.jsonl").write_bytes(b"")
    result = pipeline.run_job(tabular_job(str(folder), str(tmp_path / "out")), progress=False)
    assert result.exit_code == 0
    assert output_ids(tmp_path / "out") == sorted(table["id"].to_pylist())


def _write(tmp_path: Path, job: dict) -> str:
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


def test_empty_and_schema_only_inputs_still_commit(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(make_scoring_table(0, seed=1), folder / "empty.parquet")
    result = pipeline.run_job(tabular_job(str(folder), str(tmp_path / "out")), progress=False)
    assert result.exit_code == 0 and result.report["totals"]["rows_in"] == 0
    assert pa.types.is_integer(pq.read_schema(next((tmp_path / "out").glob("part-*"))).field("id").type)

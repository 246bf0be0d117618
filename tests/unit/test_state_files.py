"""State files written by earlier versions still read: every marker, run manifest, report and
job.json kept under tests/fixtures/state/v<N> (written by a real job of that version, see
scripts/make_state_fixtures.py) loads into its record, keeps every value it held, and drives
the code that reads it (resume, incremental planning, the summary). Add the files of each
new FORMAT_VERSION here; never delete old ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import OutputError
from pipeline.layout import OutputLayout
from pipeline.report import run_line, summary_lines
from pipeline.runs import read_runs, shards_from_markers
from pipeline.state import (
    FORMAT_VERSION,
    MIGRATIONS,
    JobDocument,
    JobReport,
    RunManifest,
    ShardMarker,
    VersionedRecord,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "state"
RECORDS: dict[str, type[VersionedRecord]] = {
    "marker": ShardMarker, "run": RunManifest, "report": JobReport, "job": JobDocument}
FILES = sorted(FIXTURES.glob("v*/*/*.json"))


def record_type(path: Path) -> type[VersionedRecord]:
    return RECORDS[path.name.split("-")[0].split(".")[0]]


def same_values(original, written, where: str = "") -> list[str]:
    """Where ``written`` lost or changed a value of ``original`` (it may add keys)."""
    if isinstance(original, dict):
        return [d for k, v in original.items()
                for d in (same_values(v, written[k], f"{where}.{k}") if k in written
                          else [f"{where}.{k} missing"])]
    if isinstance(original, list) and isinstance(written, list) and len(original) == len(written):
        return [d for i, (a, b) in enumerate(zip(original, written, strict=True))
                for d in same_values(a, b, f"{where}[{i}]")]
    return [] if original == written else [f"{where}: {original!r} became {written!r}"]


def test_fixtures_cover_every_record_of_the_current_version():
    kinds = {record_type(p) for p in FILES if p.parts[-3] == f"v{FORMAT_VERSION}"}
    assert kinds == set(RECORDS.values())


@pytest.mark.parametrize("path", FILES, ids=lambda p: "/".join(p.parts[-3:]))
def test_every_kept_file_reads_and_keeps_its_values(path):
    data = json.loads(path.read_text())
    record = record_type(path).read(data, str(path))
    assert record.format_version == FORMAT_VERSION
    assert same_values(data, record.to_dict()) == []
    again = record_type(path).read(json.loads(json.dumps(record.to_dict())), str(path))
    assert again == record  # writing and reading back changes nothing


def test_a_report_reads_by_attribute_and_by_key():
    report = JobReport.read(json.loads((FIXTURES / "v2/parquet/report.json").read_text()), "r")
    assert report.totals.rows_in == report["totals"]["rows_in"] == 120
    changed = report.run.input_files.changed
    assert changed.first == report["run"]["input_files"]["changed"]["first"]
    assert [p.rsplit("/", 1)[-1] for p in changed.first] == ["b.parquet"]
    assert report.get("no_such_key", "absent") == "absent" and "totals" in report


def test_old_reports_render_the_summary():
    failed = JobReport.read(json.loads((FIXTURES / "v2/parquet/report-failed.json").read_text()),
                            "r")
    lines = summary_lines(failed)
    assert lines[0].startswith("FAILED: 80 rows in 2/3 shards")
    assert any(line.startswith(f"  FAILED shard {failed.failures[0].shard}") for line in lines)
    retried = JobReport.read(
        json.loads((FIXTURES / "v2/parquet/report-retried.json").read_text()), "r")
    assert retried.attempts.retried_shards[0].attempts == 2
    assert run_line(retried.run).startswith("run 1 (incremental, complete)")


def test_an_output_of_the_kept_version_resumes_and_plans_incrementally(tmp_path):
    """The kept files as an output: markers list as committed, runs as complete, and the
    marker pieces give back the shards they were cut from."""
    out = tmp_path / "out" / "_pipeline"
    (out / "shards").mkdir(parents=True)
    (out / "runs").mkdir()
    marker = json.loads((FIXTURES / "v2/parquet/marker.json").read_text())
    shutil.copy(FIXTURES / "v2/parquet/marker.json", out / "shards" / f"{marker['shard_id']}.json")
    for run in ("run-000001.json", "run-000002.json"):
        shutil.copy(FIXTURES / "v2/parquet" / run, out / "runs" / run.removeprefix("run-"))
    shutil.copy(FIXTURES / "v2/parquet/job.json", out / "job.json")
    layout = OutputLayout(str(tmp_path / "out"))
    assert layout.committed_shards() == {marker["shard_id"]}
    committed = layout.committed_marker(marker["shard_id"])
    assert isinstance(committed, ShardMarker) and committed.rows_bad == marker["rows_bad"]
    runs = read_runs(layout)
    assert runs.open is None and runs.complete.run == 2 and runs.next_id() == 3
    assert runs.ledger() and all(s.pieces for s in runs.ledger().values())
    assert runs.sizing(40, None) is not None
    assert list(shards_from_markers({marker["shard_id"]: committed})) == [marker["shard_id"]]
    assert layout.read_job().output_format == "parquet"


def test_a_lance_marker_keeps_its_fragments():
    data = json.loads((FIXTURES / "v2/lance/marker.json").read_text())
    marker = ShardMarker.read(data, "m")
    assert marker.lance["fragments"] == data["lance"]["fragments"]
    assert marker.lance["rows"] == marker.rows_out == 30


def test_a_newer_version_is_refused_in_one_line():
    data = {**json.loads((FIXTURES / "v2/parquet/marker.json").read_text()),
            "format_version": FORMAT_VERSION + 1}
    with pytest.raises(OutputError) as refused:
        ShardMarker.read(data, "_pipeline/shards/x.json")
    message = str(refused.value)
    assert message.startswith("_pipeline/shards/x.json: not a valid ShardMarker")
    assert f"format version {FORMAT_VERSION + 1}" in message and "\n" not in message


def test_older_versions_read_through_their_migration(monkeypatch):
    older = {**json.loads((FIXTURES / "v2/parquet/marker.json").read_text()),
             "format_version": FORMAT_VERSION - 1}
    older["rows"] = older.pop("rows_in")  # as if the older version had named it so
    with pytest.raises(OutputError, match="cannot be read \\(no migration\\)"):
        ShardMarker.read(older, "m")

    def rename(data):
        data["rows_in"] = data.pop("rows")
        return data

    monkeypatch.setitem(MIGRATIONS, ("marker", FORMAT_VERSION - 1), rename)
    marker = ShardMarker.read(older, "m")
    assert marker.rows_in == 40 and marker.format_version == FORMAT_VERSION


def test_resuming_an_open_run_keeps_what_its_manifest_recorded(tmp_path):
    """A run that crashed after its table commit: the next invocation resumes it under the same
    id, with this invocation's plan, and keeps the commit and any key a newer writer added."""
    from pipeline.runs import start_run

    data = json.loads((FIXTURES / "v2/parquet/run-000002.json").read_text())
    data.update(status="committing", extra_from_a_newer_writer={"x": 1})
    (tmp_path / "_pipeline" / "runs").mkdir(parents=True)
    (tmp_path / "_pipeline" / "runs" / "000002.json").write_text(json.dumps(data))
    layout = OutputLayout(str(tmp_path))
    log = read_runs(layout)
    assert log.open is not None and log.open.run == 2
    base = RunManifest(run=0, mode="incremental", format="parquet", fingerprint="fp-now",
                       ledger=log.open.ledger, shards=log.open.shards)
    resumed = start_run(layout, log, base)
    assert (resumed.run, resumed.status, resumed.resumed) == (2, "running", 1)
    assert resumed.fingerprint == "fp-now" and resumed.table == data["table"]
    assert resumed.started_at == data["started_at"]
    stored = json.loads((tmp_path / "_pipeline" / "runs" / "000002.json").read_text())
    assert stored["extra_from_a_newer_writer"] == {"x": 1} and stored["table"] == data["table"]


def test_a_run_without_incremental_input_writes_no_empty_delta_keys():
    from pipeline.state import FileList, InputDelta

    manifest = RunManifest(run=1, input_files=InputDelta(new=FileList(count=1, first=["a"])))
    assert manifest.to_dict()["input_files"] == {"new": {"count": 1, "first": ["a"]}}

"""One job from its plan to its report, under its output's lease, in four phases:

    connect        pack a bundle to ship, start or join Ray, check where data and workers live
    prepare        apply the output mode, write job.json and plan.json, open the run manifest
    run_pending    run the shards not committed yet (``runner``), or nothing when none are
    finish         the report, the table commit, orphans, and last ``_SUCCESS``

``run_spec`` takes the output's lease (``pipeline.lease``: one driver per output) before it
plans, so a plan never reads an output another driver is writing; ``execute`` runs the
phases in order, renews the lease meanwhile, and commits nothing once it lost it. How the job
shows itself (progress, the summary) is the ``Console`` it is given. Planning
(``planning.plan_job``) can fail only with exit 2; the exit code of a job that ran is decided
in ``report.decide_exit``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import onnxruntime as ort
import pyarrow as pa

from pipeline.errors import InputError, OutputError, PipelineError, cause_text, storage_error
from pipeline.increment import Increment
from pipeline.isolation import remaining_pieces, root_of, roots_done
from pipeline.layout import PLAN_FILE, OutputLayout
from pipeline.lease import OutputLease
from pipeline.locality import Placement, check_placement, ships_model
from pipeline.models.shipping import PackedBundle, pack_bundle, ship_bundle
from pipeline.outcome import RunOutcome
from pipeline.output import prepare_output
from pipeline.plan import Plan, Shard
from pipeline.planning import PlannedJob, plan_job, replanned_fresh
from pipeline.progress import Console
from pipeline.ray_backend import RayActors, cluster_view, ray_job_id, ray_version, start_ray
from pipeline.redaction import redact
from pipeline.report import ReportInputs, build_report, summary_lines, with_commit_failure
from pipeline.runner import Runner
from pipeline.runs import RunLog, finish_run, listed, read_runs, sizing_record, start_run
from pipeline.sinks import TABLE_DIRS, RunCommit, Sink, sink_for
from pipeline.spec import JobSpec, OutputSpec
from pipeline.state import (
    InputDelta,
    JobDocument,
    JobReport,
    RunManifest,
    RunRows,
    ShardChanges,
    ShardMarker,
    Startup,
)
from pipeline.storage import with_retries


class Start(Enum):
    """How a job treats what its output already holds."""

    CONTINUE = "continue"  # as output.mode says: resume, add incrementally, refuse, overwrite
    FRESH = "fresh"  # --fresh: remove what earlier jobs wrote first


@dataclass
class JobResult:
    exit_code: int
    report: JobReport  # report["totals"]["rows_in"] reads as well as report.totals.rows_in
    output_uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    format: str = "parquet"
    output: OutputSpec | None = field(default=None, repr=False)  # the job's output section

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def read(self) -> pa.Table:
        """The output as a reader of its format sees it: every committed part file (Parquet),
        or the table's current version (Delta, Lance, Iceberg)."""
        layout = OutputLayout(self.output_uri, self.storage_options)
        return sink_for(self.format, self.output).read(layout)


def run_spec(spec: JobSpec, start: Start = Start.CONTINUE, address: str | None = None,
             console: Console | None = None, wait: bool = False) -> JobResult:
    """Plan, take the output's lease (``wait``: wait for another driver to give it back),
    plan again if another driver wrote the output meanwhile, run, give the lease back."""
    console = console or Console()
    fresh = start is Start.FRESH
    planned = plan_job(spec, fresh)  # reads only: an invalid job leaves no trace, lease included
    lease = take_lease(planned.spec, wait, console)
    try:
        if lease.contended or runs_changed(planned):
            planned = plan_job(spec, fresh)  # another driver wrote the output since planning
        return execute(planned, start, address, console, lease)
    finally:
        lease.release()


def runs_changed(planned: PlannedJob) -> bool:
    """An incremental plan read the output's runs: has a run been written since?"""
    if planned.increment is None:
        return False
    spec = planned.spec
    now = read_runs(OutputLayout(spec.output.uri, spec.output.storage_options)).last
    return _run_key(now) != _run_key(planned.runs.last)


def _run_key(manifest: RunManifest | None) -> tuple | None:
    return None if manifest is None else (manifest.run, manifest.status, manifest.updated_at)


def take_lease(spec: JobSpec, wait: bool, console: Console) -> OutputLease:
    """The lease of ``spec``'s output, or OutputError (exit 2) naming the driver holding it."""
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    try:
        lease = OutputLease(layout, spec.name, spec.output.lease_timeout_s)
        lease.acquire(wait, console.note)
    except PipelineError:
        raise
    except Exception as exc:  # permissions, credentials, bad storage options: nothing ran
        raise storage_error(exc, "output.uri", layout.uri, "take the lease of",
                            spec.output.storage_options) from exc
    return lease


def execute(planned: PlannedJob, start: Start = Start.CONTINUE, address: str | None = None,
            console: Console | None = None, lease: OutputLease | None = None) -> JobResult:
    """Run a planned job to its end; raises PipelineError (exit 2) when nothing could run,
    LeaseLost (exit 1) when another driver took the output over meanwhile. Without a
    ``lease`` it takes one (not waiting) and gives it back at the end."""
    console = console or Console()
    if lease is None:
        own = take_lease(planned.spec, False, console)
        try:
            return execute(planned, start, address, console, own)
        finally:
            own.release()
    started = time.time()
    connection = connect(planned, address, started)
    lease.note_ray_job(ray_job_id())
    lease.start_heartbeat()
    output = prepare(planned, start)
    outcome = run_pending(output, connection, console, lease)
    report = finish(output, outcome, connection, started, lease)
    console.summary(summary_lines(report))
    spec = output.planned.spec
    return JobResult(report.exit_code, report, output.layout.uri, spec.output.storage_options,
                     spec.output.format, spec.output)


# ----------------------------------------------------------------------------- connect


@dataclass
class Connection:
    placement: Placement
    packed: PackedBundle | None  # a node-local bundle, read before connecting
    startup: Startup


def connect(planned: PlannedJob, address: str | None, started: float) -> Connection:
    """Read a bundle to ship before connecting (a job's working directory may go with it),
    then connect, and refuse node-local data other nodes could not see (before any write)."""
    spec = planned.spec
    ships = ships_model(spec) or planned.imported  # an imported model is in this node's cache
    packed = pack_bundle(planned.bundle, spec.model.sha256) if ships else None
    pack_s = round(time.time() - started, 3)
    start_ray(address)
    ray_s = max(0.0, round(time.time() - started - pack_s, 3))
    placement = check_placement(spec, cluster_view())
    return Connection(placement, packed, Startup(plan_s=round(planned.plan_s, 3), pack_s=pack_s,
                                                 ray_s=ray_s))


# ----------------------------------------------------------------------------- prepare


@dataclass
class PreparedOutput:
    """The output ready for this run: what it holds, what runs now, the run's manifest."""

    planned: PlannedJob  # planned again when --fresh wiped an incremental output
    layout: OutputLayout
    sink: Sink
    runs: RunLog
    done: set[str]  # planned shards committed before this run (whole, or by their pieces)
    dropped: list[str]  # committed shards outside the plan (incremental: replaced, retired)
    earlier: dict[str, ShardMarker]  # markers of the done shards and committed pieces
    manifest: RunManifest | None  # None: nothing new since the last complete run
    pending: list[Shard]  # what runs now: shards, or the pieces of cut ones still missing

    @property
    def planned_ids(self) -> set[str]:
        return {s.id for s in self.planned.plan.shards}

    def owns(self, shard_id: str) -> bool:
        """A planned shard, or a piece cut from one (pipeline.isolation)."""
        return root_of(shard_id) in self.planned_ids


def prepare(planned: PlannedJob, start: Start) -> PreparedOutput:
    spec = planned.spec
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    wipe = start is Start.FRESH or spec.output.mode == "overwrite"
    try:
        committed = with_retries(lambda: prepare_output(
            layout, spec.output.mode, wipe, planned.fingerprint, spec.output.format,
            TABLE_DIRS), f"preparing {layout.uri}")
        drop = getattr(sink_for(spec.output.format, spec.output), "drop", None)
        if wipe and drop is not None:  # a catalog table: its files were just wiped
            with_retries(lambda: drop(layout), "dropping the output table")
        if planned.increment is not None and start is Start.FRESH:
            planned = replanned_fresh(planned)  # the output was wiped: everything is new
        if planned.increment is None:
            check_not_stale(planned, committed, layout.uri)
        with_retries(lambda: layout.write_job(job_document(planned)), "writing job.json")
        with_retries(lambda: layout.write_json(PLAN_FILE, planned.plan.document()),
                     f"writing {PLAN_FILE}")
        runs = with_retries(lambda: read_runs(layout), "reading run manifests")
    except PipelineError:
        raise
    except Exception as exc:  # permissions, credentials, bad storage options: nothing ran
        raise storage_error(exc, "output.uri", layout.uri, "prepare",
                            spec.output.storage_options) from exc
    planned_ids = {s.id for s in planned.plan.shards}
    owned = {sid for sid in committed if root_of(sid) in planned_ids}
    done = roots_done(planned_ids, owned)
    pending: list[Shard] = []
    for shard in planned.plan.shards:
        if shard.id not in done:  # whole, or the pieces a cut left without a marker
            pieces = remaining_pieces(shard, owned)
            pending.extend([shard] if pieces is None else pieces)
    dropped = sorted(committed - owned)
    earlier = with_retries(lambda: layout.read_markers(sorted(owned)), "reading shard markers")
    up_to_date = (len(done) == len(planned_ids) and not dropped and runs.open is None
                  and runs.complete is not None)
    manifest = None if up_to_date else with_retries(
        lambda: start_run(layout, runs, run_record(planned, runs, dropped)),
        "writing the run manifest")
    return PreparedOutput(planned, layout, sink_for(spec.output.format, spec.output), runs, done,
                          dropped,
                          earlier, manifest, pending)


def job_document(planned: PlannedJob) -> JobDocument:
    spec = planned.spec
    return JobDocument(
        name=spec.name, fingerprint=planned.fingerprint, model_sha256=planned.bundle.sha256,
        bundle_identity=planned.bundle.identity, spec=redact(spec.model_dump(mode="json")),
        shards=len(planned.plan.shards), files=len(planned.plan.files),
        rows=planned.plan.total_rows,
        versions={"python": platform.python_version(), "onnxruntime": ort.__version__,
                  "pyarrow": pa.__version__, "ray": ray_version()},
        input_table=planned.table.record() if planned.table else None,
        written_at=time.time())


def check_not_stale(planned: PlannedJob, committed: set[str], uri: str) -> None:
    """Committed shards missing from the plan mean the input changed (shard ids hash each
    file's etag or size): resuming would mix old and new rows."""
    planned_ids = {s.id for s in planned.plan.shards}
    stale = {sid for sid in committed if root_of(sid) not in planned_ids}
    if not stale:
        return
    broken = [f for f in planned.plan.files if f.error]
    if broken:  # maybe only unreadable right now: do not send the user to --fresh
        raise InputError(f"{broken[0].uri}: {broken[0].error}; it may hold shards committed "
                         f"in {uri}, so the job stops here (fix the file and rerun)")
    raise OutputError(
        f"output.uri: {uri} holds {len(stale)} committed shards that the current input does "
        "not produce (input files changed since the first run); use --fresh")


def run_record(planned: PlannedJob, runs: RunLog, dropped: list[str]) -> RunManifest:
    """What a run's manifest says at its start: mode, input delta, shards, the ledger."""
    spec, plan, inc = planned.spec, planned.plan, planned.increment
    held_before = {s.id for s in runs.complete.ledger} if runs.complete else set()
    files, replaced, retired = _input_delta(plan, inc, held_before, dropped)
    shards = ShardChanges(total=len(plan.shards),
                          added=sorted(s.id for s in plan.shards if s.id not in held_before),
                          kept=sum(1 for s in plan.shards if s.id in held_before),
                          replaced=replaced, retired=retired)
    return RunManifest(
        run=0, mode=spec.output.mode, format=spec.output.format, fingerprint=planned.fingerprint,
        input_files=files, shards=shards, ledger=list(plan.shards),
        input_table=planned.table.record() if planned.table else None,
        deleted_rows_not_kept=listed(inc.lost_with_deleted) if inc and inc.lost_with_deleted
        else None,
        sizing=sizing_record(plan.sizing, spec.sharding.bytes_per_shard) if plan.sizing else None)


def _input_delta(plan: Plan, inc: Increment | None, held_before: set[str],
                 dropped: list[str]) -> tuple[InputDelta, list[str], list[str]]:
    """Files new, changed and deleted since the last run, and the shards replaced and retired."""
    if inc is None:
        new = listed([f.uri for f in plan.files]) if not held_before else None
        return InputDelta(new=new), [], sorted(dropped)
    files = InputDelta(new=listed(inc.files_new), changed=listed(inc.files_changed),
                       deleted=listed(inc.files_deleted), unchanged=inc.files_unchanged)
    replaced = sorted(set(inc.replaced) & set(dropped))
    return files, replaced, sorted(set(dropped) - set(inc.replaced))


# ----------------------------------------------------------------------------- run


def run_pending(output: PreparedOutput, connection: Connection, console: Console,
                lease: OutputLease) -> RunOutcome:
    """The shards not committed yet, on Ray; a note instead when there are none."""
    planned = output.planned
    plan = planned.plan
    bar = console.progress(plan.total_rows, len(plan.shards),
                           sum(m.rows_in for m in output.earlier.values()), len(output.done))
    lost = lease.lost()
    if lost:  # taken over while preparing: nothing more is sent
        bar.close()
        return RunOutcome(aborted=lost)
    try:
        pending = output.pending
        if not pending:
            return RunOutcome(notes=[_nothing_to_run(output)])
        shipped = ship_bundle(connection.packed) if connection.packed else None
        actors = RayActors(planned.spec, planned.fingerprint, planned.read_columns,
                           connection.placement, shipped, planned.bundle.identity)
        return Runner(planned.spec, pending, actors, progress=bar,
                      placement=connection.placement, stop=lease.lost).run()
    finally:
        bar.close()


def _nothing_to_run(output: PreparedOutput) -> str:
    runs, inc = output.runs, output.planned.increment
    if output.manifest is not None or runs.complete is None:
        return "every shard was already committed"
    note = f"nothing new since run {runs.complete.run}"
    if inc is not None and inc.files_deleted:
        note += (f" ({len(inc.files_deleted)} deleted input files; their rows are kept, as "
                 "output.deleted_inputs says)")
    return note


# ----------------------------------------------------------------------------- finish


def finish(output: PreparedOutput, outcome: RunOutcome, connection: Connection,
           started: float, lease: OutputLease) -> JobReport:
    """The report; for a run whose every shard committed, the table commit, the orphans and
    ``_SUCCESS`` (written last, only when the output is complete). A driver that lost its
    lease writes none of them (LeaseLost)."""
    lease.check()
    planned, layout = output.planned, output.layout
    spec = planned.spec
    report = build_report(ReportInputs(spec.name, layout.uri, planned.plan, planned.fingerprint,
                                       planned.bundle, started, spec.bad_rows.max_fraction),
                          outcome, output.earlier)
    report.startup = connection.startup.model_copy(update={
        "first_worker_ready_s": round(outcome.first_worker_at - started, 3)
        if outcome.first_worker_at is not None else None,
        "first_shard_s": report.totals.first_shard_s})
    manifest = output.manifest
    if manifest is not None and report.exit_code == 0:
        manifest, failure = _commit_run(output, outcome, manifest)
        if failure:
            report = with_commit_failure(report, failure)
    latest = manifest or output.runs.complete
    report.run = latest.public_view() if latest is not None else None
    with_retries(lambda: layout.write_report(report), "writing report.json")
    if report.exit_code == 0:
        lease.check()  # the commit took time: still ours before the last steps
        keep = output.planned_ids | set(output.earlier) | set(outcome.markers)
        with_retries(lambda: layout.remove_orphans(keep,
                                                   parts=not output.sink.keeps_dropped_files),
                     "removing orphaned part files")
        with_retries(layout.write_success, "writing _SUCCESS")
    return report


def _commit_run(output: PreparedOutput, outcome: RunOutcome,
                manifest: RunManifest) -> tuple[RunManifest, str | None]:
    """The run's table commit (every step repeats safely: a retry commits once); on failure
    the shards stand and the next invocation commits the run."""
    layout, spec = output.layout, output.planned.spec
    live = {**output.earlier,
            **{sid: m for sid, m in outcome.markers.items() if output.owns(sid)}}
    gone = with_retries(lambda: layout.read_markers(output.dropped), "reading dropped markers")
    added = set(manifest.shards.added)
    commit = RunCommit(manifest.run, output.planned.fingerprint, live, gone, spec.output.index,
                       {sid for sid in live if root_of(sid) in added}, manifest.token)
    manifest.rows = RunRows(total=sum(m.rows_out for m in live.values()),
                            added=sum(m.rows_out for sid, m in live.items()
                                      if root_of(sid) in added),
                            removed=sum(m.rows_out for m in gone.values()))
    try:
        return with_retries(lambda: finish_run(layout, output.sink, manifest, commit,
                                               output.dropped),
                            f"committing run {commit.run_id}"), None
    except Exception as exc:  # the shards stand; the next invocation commits the run
        return manifest, (f"run {commit.run_id}: the {output.sink.format} commit failed, every "
                          "shard is committed and a rerun commits the run "
                          f"({cause_text(exc, spec.output.storage_options, spec.output.catalog)})")

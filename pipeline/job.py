"""One job from spec to report: validate the model, plan, prepare the output, run, report."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any

import onnxruntime as ort
import pyarrow as pa

from pipeline import storage
from pipeline.commit import OutputLayout, prepare_output
from pipeline.errors import ConfigError, InputError, OutputError, PipelineError, access_error
from pipeline.increment import Increment, plan_increment
from pipeline.locality import check_placement, resolve_spec, ships_model
from pipeline.models.bundle import LocalBundle, fetch_bundle
from pipeline.models.shipping import pack_bundle, ship_bundle
from pipeline.models.validate import validate_bundle
from pipeline.plan import (
    Plan,
    check_output_not_input,
    known_files,
    make_plan,
    measure_sizing,
    survey,
)
from pipeline.progress import Progress
from pipeline.redaction import scrub
from pipeline.report import build_report, read_markers, summary_lines
from pipeline.runs import (
    RunLog,
    finish_run,
    listed,
    public_view,
    read_runs,
    shards_from_markers,
    sizing_record,
    start_run,
)
from pipeline.sinks import TABLE_DIRS, RunCommit, sink_for
from pipeline.spec import JobSpec, output_columns, redact
from pipeline.storage import with_retries
from pipeline.tasks import build_task

FORMAT_VERSION = 2  # 2: shards of pieces (split row groups, byte ranges, packed small files)
PLAN_FILE = "plan.json"


@dataclass
class JobResult:
    exit_code: int
    report: dict[str, Any]
    output_uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    format: str = "parquet"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def read(self) -> pa.Table:
        """The output as a reader of its format sees it: every committed part file (Parquet),
        or the table's current version (Delta, Lance)."""
        layout = OutputLayout(self.output_uri, self.storage_options)
        return sink_for(self.format).read(layout)


@dataclass
class PlannedJob:
    spec: JobSpec
    bundle: LocalBundle
    plan: Plan
    fingerprint: str
    read_columns: list[str]
    provider_checks: list[Any]
    plan_s: float = 0.0  # planning time: bundle fetch and smoke run, listing, footers
    increment: Increment | None = None  # incremental mode: what this run keeps and changes
    runs: RunLog = field(default_factory=RunLog)


def fingerprint_of(spec: JobSpec, bundle_identity: str) -> str:
    payload = {"format": FORMAT_VERSION, "bundle": bundle_identity, **spec.fingerprint_fields()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_job(spec: JobSpec) -> PlannedJob:
    """Everything that can fail before a worker starts (exit 2 territory)."""
    started = time.perf_counter()
    spec = resolve_spec(spec)  # workers never resolve a path in their own working directory
    check_table_library(spec.output.format)
    bundle = fetch_bundle(spec.model.uri, spec.model.storage_options, spec.model.sha256)
    report = validate_bundle(bundle, smoke=True, providers=["cpu"])
    task = build_task(bundle, spec.task, spec.batching, {})
    if spec.input.columns is not None:
        missing = [c for c in [*task.input_columns, *spec.passthrough] if c not in spec.input.columns]
        if missing:
            raise ConfigError(f"input.columns: {missing[0]!r} is used by the job but not listed")
        read_columns = list(spec.input.columns)
    else:
        read_columns = list(dict.fromkeys([*spec.passthrough, *task.input_columns]))
    clash = set(output_columns(spec.task)) & set(spec.passthrough)
    if clash:
        raise ConfigError(f"passthrough: {sorted(clash)[0]!r} clashes with a task output column")
    known = known_files(_earlier_plan(spec))
    increment, runs = None, RunLog()
    if spec.output.mode == "incremental":
        plan, increment, runs = _plan_incremental(spec, read_columns, known)
    else:
        plan = make_plan(spec.input.uri, spec.input.format, spec.input.storage_options,
                         spec.sharding.rows_per_shard, read_columns,
                         spec.sharding.bytes_per_shard, known=known)
    if plan.files and all(f.error for f in plan.files):
        raise InputError(f"{plan.files[0].uri}: {plan.files[0].error} (no input file is readable)")
    try:
        check_output_not_input(spec.output.uri, plan.files, spec.output.storage_options,
                               spec.input.uri, spec.input.storage_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"output.storage_options: {type(exc).__name__}: "
                          f"{scrub(str(exc), spec.output.storage_options)}") from None
    return PlannedJob(spec, bundle, plan, fingerprint_of(spec, bundle.identity), read_columns,
                      report.providers, time.perf_counter() - started, increment, runs)


TABLE_LIBRARIES = {"delta": "deltalake", "lance": "lance"}


def check_table_library(fmt: str) -> None:
    """A table format whose library is missing: exit 2 before anything runs."""
    import importlib.util

    module = TABLE_LIBRARIES.get(fmt)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"output.format: {fmt} needs the {module} package, which is not "
                          "installed (pip install 'onnx-ray-pipeline[tables]')")


def _plan_incremental(spec: JobSpec, read_columns: list[str],
                      known: dict) -> tuple[Plan, Increment, RunLog]:
    """The input as listed now against the shards the output holds (see ``increment``)."""
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    try:  # never guess: an output read as empty would recompute (and drop) everything
        runs = with_retries(lambda: read_runs(layout), "reading run manifests")
        committed = with_retries(layout.committed_shards, "listing shard markers")
    except PipelineError:
        raise
    except Exception as exc:
        access = access_error(exc, "output.uri", spec.output.uri)
        if access is not None:
            raise access from None
        text = " ".join(scrub(str(exc), spec.output.storage_options).split())[:200]
        raise OutputError(f"output.uri: cannot read the runs of {layout.uri} "
                          f"({type(exc).__name__}: {text})") from None
    sh = spec.sharding
    files, sizing = survey(spec.input.uri, spec.input.format, spec.input.storage_options,
                           sh.rows_per_shard, read_columns, sh.bytes_per_shard, known,
                           sizing=runs.sizing(sh.rows_per_shard, sh.bytes_per_shard))
    ledger = runs.ledger()
    if not ledger and committed:  # an output written before runs had manifests
        markers = with_retries(lambda: read_markers(layout, sorted(committed)),
                               "reading shard markers")
        ledger = shards_from_markers(markers)
    held = [ledger[sid] for sid in sorted(committed) if sid in ledger]
    increment = plan_increment(files, sizing, held, spec.output.deleted_inputs == "keep")
    return Plan(increment.shards, files, read_columns, sizing), increment, runs


def _replanned_fresh(planned: PlannedJob) -> PlannedJob:
    """--fresh over an incremental output: everything is new (the output was wiped)."""
    plan, sharding = planned.plan, planned.spec.sharding
    sizing = measure_sizing(plan.files, sharding.rows_per_shard, sharding.bytes_per_shard)
    increment = plan_increment(plan.files, sizing, [], False)
    new_plan = Plan(increment.shards, plan.files, plan.read_columns, sizing)
    return replace(planned, plan=new_plan, increment=increment, runs=RunLog())


def _earlier_plan(spec: JobSpec) -> dict[str, Any] | None:
    """The plan an earlier run saved in the output: its footers need not be read again.

    No output yet, or a plan.json that cannot be parsed or read right now: plan from scratch.
    No credentials, access denied or a missing bucket: stop here (exit 2), before Ray starts,
    since writing the output would fail the same way after planning the whole input.
    """
    try:
        return OutputLayout(spec.output.uri, spec.output.storage_options).read_json(PLAN_FILE)
    except Exception as exc:
        access = access_error(exc, "output.uri", spec.output.uri)
        if access is not None:
            raise access from None
        return None


def job_document(planned: PlannedJob) -> dict[str, Any]:
    import ray

    spec = planned.spec
    return {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "fingerprint": planned.fingerprint,
        "model_sha256": planned.bundle.sha256,
        "bundle_identity": planned.bundle.identity,
        "spec": redact(spec.model_dump(mode="json")),
        "shards": len(planned.plan.shards),
        "files": len(planned.plan.files),
        "rows": planned.plan.total_rows,
        "versions": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                     "pyarrow": pa.__version__, "ray": ray.__version__},
        "written_at": time.time(),
    }


def execute(planned: PlannedJob, fresh: bool = False, address: str | None = None,
            progress: bool = True, echo: bool = True) -> JobResult:
    from pipeline.runner import Runner, cluster_view, start_ray

    spec = planned.spec
    started = time.time()
    # Read a bundle to ship before connecting: a job's working directory may go with it.
    packed = pack_bundle(planned.bundle, spec.model.sha256) if ships_model(spec) else None
    startup = {"plan_s": round(planned.plan_s, 3), "pack_s": round(time.time() - started, 3)}
    start_ray(address)
    startup["ray_s"] = max(0.0, round(time.time() - started - startup["pack_s"], 3))
    placement = check_placement(spec, cluster_view())  # before anything is written
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    sink = sink_for(spec.output.format)
    document = job_document(planned)
    try:
        committed = with_retries(
            lambda: prepare_output(layout, spec.output.mode, fresh, planned.fingerprint,
                                   spec.output.format, TABLE_DIRS),
            f"preparing {layout.uri}")
        if planned.increment is not None and fresh:
            planned = _replanned_fresh(planned)  # the output was wiped: everything is new
        if planned.increment is None:
            check_not_stale(planned, committed, layout.uri)
        with_retries(lambda: layout.write_json("job.json", document), "writing job.json")
        with_retries(lambda: layout.write_json(PLAN_FILE, planned.plan.document()),
                     f"writing {PLAN_FILE}")
        runs = with_retries(lambda: read_runs(layout), "reading run manifests")
    except PipelineError:
        raise
    except Exception as exc:  # permissions, credentials, bad storage options: nothing ran
        access = access_error(exc, "output.uri", layout.uri)
        if access is not None:
            raise access from None
        text = " ".join(scrub(str(exc), spec.output.storage_options).split())[:200]
        raise OutputError(f"output.uri: cannot prepare {layout.uri} "
                          f"({type(exc).__name__}: {text})") from None
    planned_ids = {s.id for s in planned.plan.shards}
    done = committed & planned_ids
    dropped = sorted(committed - planned_ids)  # incremental: replaced, retired, orphaned
    earlier = with_retries(lambda: read_markers(layout, sorted(done)), "reading shard markers")
    pending = [s for s in planned.plan.shards if s.id not in done]
    up_to_date = not pending and not dropped and runs.open is None and runs.complete is not None
    manifest = None if up_to_date else with_retries(
        lambda: start_run(layout, runs, _run_record(planned, runs, dropped)),
        "writing the run manifest")

    bar = Progress(planned.plan.total_rows, len(planned.plan.shards),
                   sum(m["rows_in"] for m in earlier.values()), len(done), enabled=progress)
    if pending:
        shipped = ship_bundle(packed) if packed else None
        runner = Runner(spec, planned.fingerprint, planned.read_columns, pending,
                        progress=bar, placement=placement, shipped_bundle=shipped,
                        bundle_identity=planned.bundle.identity)
        outcome = runner.run()
    else:
        from pipeline.runner import RunOutcome

        note = (f"nothing new since run {runs.complete['run']}" if up_to_date and runs.complete
                else "every shard was already committed")
        if up_to_date and planned.increment is not None and planned.increment.files_deleted:
            note += (f" ({len(planned.increment.files_deleted)} deleted input files; their rows "
                     "are kept, as output.deleted_inputs says)")
        outcome = RunOutcome(notes=[note])
    bar.close()

    report = build_report(name=spec.name, layout=layout, plan=planned.plan,
                          fingerprint=planned.fingerprint, bundle=planned.bundle,
                          outcome=outcome, earlier=earlier, started_at=started,
                          max_bad_fraction=spec.bad_rows.max_fraction)
    if outcome.first_worker_at is not None:
        startup["first_worker_ready_s"] = round(outcome.first_worker_at - started, 3)
    report["startup"] = {**startup, "first_shard_s": report["totals"]["first_shard_s"]}
    if manifest is not None and report["exit_code"] == 0:
        live = {**earlier, **{sid: m for sid, m in outcome.markers.items() if sid in planned_ids}}
        gone = with_retries(lambda: read_markers(layout, dropped), "reading dropped markers")
        index = spec.output.index.model_dump() if spec.output.index else None
        commit = RunCommit(int(manifest["run"]), planned.fingerprint, live, gone, index)
        _count_rows(manifest, live, gone)
        try:  # every step repeats safely: a retry after a transient error commits once
            manifest = with_retries(lambda: finish_run(layout, sink, manifest, commit, dropped),
                                    f"committing run {commit.run_id}")
        except Exception as exc:  # the shards stand; the next invocation commits the run
            text = " ".join(scrub(str(exc), spec.output.storage_options).split())[:300]
            report.update(exit_code=1, status="failed", aborted=(
                f"run {commit.run_id}: the {sink.format} commit failed, every shard is committed "
                f"and a rerun commits the run ({type(exc).__name__}: {text})"))
    latest = manifest or runs.complete
    if latest is not None:
        report["run"] = public_view(latest)
    with_retries(lambda: layout.write_json("report.json", report), "writing report.json")
    if report["exit_code"] == 0:
        with_retries(lambda: layout.remove_orphans(planned_ids, parts=not sink.keeps_dropped_files),
                     "removing orphaned part files")
        # Last: only a complete output carries it.
        with_retries(layout.write_success, "writing _SUCCESS")
    if echo:
        print("\n".join(summary_lines(report)), flush=True)
    return JobResult(report["exit_code"], report, layout.uri, spec.output.storage_options,
                     spec.output.format)


def _run_record(planned: PlannedJob, runs: RunLog, dropped: list[str]) -> dict[str, Any]:
    """What a run's manifest says at its start: mode, input delta, shards, the ledger."""
    spec, plan, inc = planned.spec, planned.plan, planned.increment
    before = runs.complete["ledger"] if runs.complete else []
    held_before = {s["id"] for s in before}
    if inc is not None:
        files = {"new": listed(inc.files_new), "changed": listed(inc.files_changed),
                 "deleted": listed(inc.files_deleted), "unchanged": inc.files_unchanged}
        replaced, retired = sorted(set(inc.replaced) & set(dropped)), sorted(
            set(dropped) - set(inc.replaced))
    else:
        files = {"new": listed([f.uri for f in plan.files])} if not held_before else {}
        replaced, retired = [], sorted(dropped)
    record: dict[str, Any] = {
        "mode": spec.output.mode, "format": spec.output.format,
        "fingerprint": planned.fingerprint, "input_files": files,
        "shards": {"total": len(plan.shards),
                   "added": sorted(s.id for s in plan.shards if s.id not in held_before),
                   "kept": sum(1 for s in plan.shards if s.id in held_before),
                   "replaced": replaced, "retired": retired},
        "ledger": [s.to_dict() for s in plan.shards],
    }
    if inc is not None and inc.lost_with_deleted:
        record["deleted_rows_not_kept"] = listed(inc.lost_with_deleted)
    if plan.sizing is not None:
        record["sizing"] = sizing_record(plan.sizing, spec.sharding.bytes_per_shard)
    return record


def _count_rows(manifest: dict[str, Any], live: dict[str, dict[str, Any]],
                gone: dict[str, dict[str, Any]]) -> None:
    added = set(manifest["shards"]["added"])
    manifest["rows"] = {
        "total": sum(m.get("rows_out", 0) for m in live.values()),
        "added": sum(m.get("rows_out", 0) for sid, m in live.items() if sid in added),
        "removed": sum(m.get("rows_out", 0) for m in gone.values()),
    }


def _replicas_text(pool: Any, cpus: float | None, shards: int) -> str:
    if pool.replicas != "auto":
        return f"replicas={pool.replicas}"
    bound = min(pool.max_replicas or shards, shards)
    text = f"replicas=auto (as many as the cluster gives, up to {bound}"
    if cpus:  # what a local cluster on this machine would give
        text += f"; {min(bound, max(1, int((os.cpu_count() or 1) // cpus)))} on this machine"
    return text + ")"


def check_not_stale(planned: PlannedJob, committed: set[str], uri: str) -> None:
    """Committed shards missing from the plan mean the input changed (shard ids hash each
    file's etag or size): resuming would mix old and new rows."""
    stale = committed - {s.id for s in planned.plan.shards}
    if not stale:
        return
    broken = [f for f in planned.plan.files if f.error]
    if broken:  # maybe only unreadable right now: do not send the user to --fresh
        raise InputError(f"{broken[0].uri}: {broken[0].error}; it may hold shards committed "
                         f"in {uri}, so the job stops here (fix the file and rerun)")
    raise OutputError(
        f"output.uri: {uri} holds {len(stale)} committed shards that the current input does "
        "not produce (input files changed since the first run); use --fresh")


def describe_plan(planned: PlannedJob) -> list[str]:
    """The --dry-run text: what would run, where, on which providers."""
    spec, plan = planned.spec, planned.plan
    rows = plan.total_rows
    lines = [
        f"job {spec.name}: {len(plan.files)} files, {len(plan.shards)} shards, "
        f"{rows if rows is not None else 'unknown (footers not read)'} rows, "
        f"{plan.total_bytes / 1e6:.1f} MB",
        f"model {spec.model.uri} (sha256 {planned.bundle.sha256[:12]}…, task {spec.task.kind})",
        f"reads columns: {', '.join(planned.read_columns)}",
    ]
    for f in plan.files[:10]:
        state = f" [{f.error}]" if f.error else ""
        rg = f", {len(f.row_group_rows)} row groups" if f.row_group_rows is not None else ""
        lines.append(f"  {f.uri} ({f.format}, {f.size / 1e6:.2f} MB{rg}){state}")
    if len(plan.files) > 10:
        lines.append(f"  … and {len(plan.files) - 10} more files")
    w = spec.workers
    lines.append(f"workers: cpu {_replicas_text(w.cpu, w.cpu.cpus, len(plan.shards))} x "
                 f"{w.cpu.cpus:g} CPU; gpu {_replicas_text(w.gpu, None, len(plan.shards))} x "
                 f"{w.gpu.gpus:g} GPU; {w.max_in_flight} shards in flight per worker")
    from pipeline.sessions import SessionSettings, create_session

    for pool, providers in (("cpu", spec.providers.cpu), ("gpu", spec.providers.gpu)):
        if pool == "gpu" and not w.gpu.replicas:
            continue
        loaded = create_session(str(planned.bundle.model_path),
                                SessionSettings(providers=tuple(providers)))
        note = f" ({loaded.fallback})" if loaded.fallback else ""
        lines.append(f"providers {pool}: asked {', '.join(providers)}; "
                     f"here runs on {loaded.active}{note}")
    inc = planned.increment
    if inc is not None:
        held = len(inc.kept)
        lines.append(f"incremental: files +{len(inc.files_new)} new, {len(inc.files_changed)} "
                     f"changed, {len(inc.files_deleted)} deleted, {inc.files_unchanged} "
                     f"unchanged; shards: keep {held}, compute up to {len(plan.shards) - held}, "
                     f"replace {len(inc.replaced)}, retire {len(inc.retired)}")
    lines.append(f"output {storage.join(spec.output.uri, '')} (format {spec.output.format}, "
                 f"mode {spec.output.mode}); dry run: nothing written")
    return lines

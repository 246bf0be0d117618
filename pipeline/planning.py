"""Planning a job: everything that can fail before a worker starts (exit 2 territory).

``plan_job`` resolves the spec's URIs, checks the model against the installed runtime (a
smoke run), lists the input and cuts it into shards (reusing footers an earlier run saved in
``plan.json``), and, for incremental outputs, works out what the run keeps and computes.
``describe_plan`` is the ``--dry-run`` text of the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline import storage
from pipeline.arrow_types import decode_schema
from pipeline.errors import (
    ConfigError,
    InputError,
    PipelineError,
    access_error,
    cause_text,
    storage_error,
)
from pipeline.increment import Increment, plan_increment
from pipeline.isolation import roots_done
from pipeline.layout import PLAN_FILE, OutputLayout
from pipeline.listing import inspect
from pipeline.locality import resolve_spec
from pipeline.models.bundle import LocalBundle
from pipeline.models.importing import open_model
from pipeline.models.validate import ProviderCheck, validate_bundle
from pipeline.plan import (
    Plan,
    Shard,
    check_output_not_input,
    known_files,
    make_plan,
    measure_sizing,
    survey,
)
from pipeline.runs import RunLog, read_runs, shards_from_markers
from pipeline.sessions import SessionSettings, create_session
from pipeline.sources import Listing, TableVersion, check_filter, list_input, require_library
from pipeline.sources.filters import to_arrow
from pipeline.sources.iceberg import worker_storage_options as iceberg_worker_options
from pipeline.spec import ClassifyTaskSpec, JobSpec, ShardingSpec, output_clash, output_columns
from pipeline.state import FORMAT_VERSION
from pipeline.storage import with_retries
from pipeline.tasks import build_task, resolve_task
from pipeline.tasks.classify import feature_columns_from

IMAGE_ROWS_PER_SHARD = 250  # a few seconds of one CPU worker: a short tail at the end
GENERATE_ROWS_PER_SHARD = 32  # one or two batches: seconds for a small model, minutes for an LLM


@dataclass
class PlannedJob:
    spec: JobSpec
    bundle: LocalBundle
    plan: Plan
    fingerprint: str
    read_columns: list[str]
    provider_checks: list[ProviderCheck]
    plan_s: float = 0.0  # planning time: bundle fetch and smoke run, listing, footers
    increment: Increment | None = None  # incremental mode: what this run keeps and changes
    runs: RunLog = field(default_factory=RunLog)
    imported: bool = False  # model.uri named a converter's output, imported on this node
    table: TableVersion | None = None  # a table input: the version this job reads


def fingerprint_of(spec: JobSpec, bundle_identity: str) -> str:
    payload = {"format": FORMAT_VERSION, "bundle": bundle_identity, **spec.fingerprint_fields()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_job(spec: JobSpec, fresh: bool = False) -> PlannedJob:
    """Everything that can fail before a worker starts (exit 2 territory). ``fresh``: the
    output will be wiped, so a table input is read at its current version."""
    started = time.perf_counter()
    spec = resolve_spec(spec)  # workers never resolve a path in their own working directory
    require_library(spec.output.format, "output.format")
    require_library(spec.input.format, "input.format")
    bundle, imported = open_model(spec.model.uri, spec.model.storage_options, spec.model.sha256)
    report = validate_bundle(bundle, smoke=True, providers=["cpu"])
    listing = list_input(spec.input, _table_version(spec, fresh))
    spec = _with_table_version(spec, listing)
    spec = with_task(spec, bundle, listing)
    read_columns = _read_columns(spec, bundle)
    check_filter(spec.input.filter, listing.files[0].columns if listing.files else None)
    known = known_files(_earlier_plan(spec))
    increment, runs = None, RunLog()
    check_merge_key(spec)
    if spec.output.mode in ("incremental", "merge"):  # a merge upserts what changed
        plan, increment, runs = _plan_incremental(spec, read_columns, known, listing)
    else:
        plan = make_plan(str(spec.input.uri), spec.input.format, spec.input.storage_options,
                         spec.sharding.rows_per_shard, read_columns,
                         spec.sharding.bytes_per_shard, known=known, listed=listing.files,
                         unified=list(spec.passthrough))
    if plan.files and all(f.error for f in plan.files):
        raise InputError(f"{plan.files[0].uri}: {plan.files[0].error} (no input file is readable)")
    check_filter_types(spec.input.filter, plan.files)
    plan.shards = _rows_known(plan.shards, spec.input.filter)
    try:
        check_output_not_input(spec.output.uri, plan.files, spec.output.storage_options,
                               listing.location or str(spec.input.uri),
                               spec.input.storage_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"output.storage_options: "
                          f"{cause_text(exc, spec.output.storage_options)}") from exc
    return PlannedJob(spec, bundle, plan, fingerprint_of(spec, bundle.identity), read_columns,
                      report.providers, time.perf_counter() - started, increment, runs, imported,
                      listing.table)


def check_merge_key(spec: JobSpec) -> None:
    """output.key names columns the output has: passthrough columns or task outputs."""
    if spec.output.key is None:
        return
    written = [*spec.passthrough, *output_columns(spec.task)]
    missing = [k for k in spec.output.key if k not in written]
    if missing:
        raise ConfigError(f"output.key: column {missing[0]!r} is not written by the job; add "
                          "it to passthrough (the output has: " + ", ".join(written) + ")")


def _table_version(spec: JobSpec, fresh: bool) -> int | None:
    """The version a table input is read at: ``input.version``; else the one the output's
    runs recorded, for a run this invocation resumes (an open run, or in resume mode the last
    run: the job finishes over the input it started on); else None (the current one)."""
    if not spec.input.is_table or spec.input.version is not None:
        return spec.input.version
    if fresh or spec.output.mode == "overwrite":
        return None
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    try:  # no output yet reads as no runs; anything else must not silently move versions
        runs = with_retries(lambda: read_runs(layout), "reading run manifests")
    except PipelineError:
        raise
    except Exception as exc:
        raise storage_error(exc, "output.uri", layout.uri, "read the runs of",
                            spec.output.storage_options) from exc
    manifest = runs.open or (runs.complete if spec.output.mode == "resume" else None)
    recorded = manifest.input_table if manifest is not None else None
    if recorded and recorded.get("format") == spec.input.format and \
            recorded.get("version") is not None:
        return int(recorded["version"])
    return None


def _with_table_version(spec: JobSpec, listing: Listing) -> JobSpec:
    """The spec as it ran: the table version read (job.json records it), and for Iceberg the
    storage options workers read data files with."""
    if listing.table is None:
        return spec
    update: dict[str, Any] = {"version": listing.table.version}  # None: an empty table
    if spec.input.format == "iceberg" and not spec.input.storage_options:
        update["storage_options"] = iceberg_worker_options(spec.input)
    return spec.model_copy(update={"input": spec.input.model_copy(update=update)})


def check_filter_types(row_filter: str | None, files: list) -> None:
    """The filter against the first schema planning read: a missing column or a literal
    that is no value of its column exits 2 here, not in every shard."""
    schema = next((f.schema for f in files if f.schema is not None and not f.error), None)
    if row_filter and schema is not None:
        to_arrow(row_filter, decode_schema(schema))


def _rows_known(shards: list[Shard], row_filter: str | None) -> list[Shard]:
    """A filter, or the deletes of a table's data file, drop rows that a footer counts: such
    shards' row counts are unknown until read."""
    def dropped(shard: Shard) -> bool:
        return bool(row_filter) or any(p.read and p.format == "parquet" and
                                       ("dv=" in p.version or "del=" in p.version)
                                       for p in shard.pieces)
    return [replace(s, rows=None) if s.rows is not None and dropped(s) else s for s in shards]


def with_task(spec: JobSpec, bundle: LocalBundle, listing: Listing | None = None) -> JobSpec:
    """The job's task in full: the bundle's own when the job has no task block, the
    conventional columns where it leaves them out, the input's columns for a model whose
    converter kept no feature names."""
    task = resolve_task(spec.task, bundle)
    clash = output_clash(task, spec.passthrough)
    if clash:
        raise ConfigError(f"passthrough: {clash}")
    if isinstance(task, ClassifyTaskSpec) and bundle.spec.modality == "tabular" and \
            not task.feature_columns and not bundle.spec.features:
        listing = listing or list_input(spec.input, spec.input.version)
        if not listing.files:
            raise InputError(f"input: {spec.input.where} has no rows to take feature names from")
        first = listing.files[0]
        if first.columns is None:
            inspect([first], spec.input.storage_options, sample=True)
        if first.columns is None:
            raise InputError(f"{first.uri}: {first.error or 'its columns cannot be read'}")
        names = feature_columns_from(first.columns, spec.passthrough, bundle.spec.feature_count,
                                     first.uri)
        task = task.model_copy(update={"feature_columns": names})
    return spec.model_copy(update={"task": task, "sharding": _sharding(spec, bundle)})


def _sharding(spec: JobSpec, bundle: LocalBundle) -> ShardingSpec:
    """Shards of IMAGE_ROWS_PER_SHARD images, or GENERATE_ROWS_PER_SHARD prompts, where the
    job sets no size: an image costs a hundred times a text row and a generated text a
    thousand, and 10,000 of them would leave all but one worker idle on a few thousand rows
    (a shard is also the work a crash loses)."""
    sharding = spec.sharding
    if "rows_per_shard" in sharding.model_fields_set:
        return sharding
    if bundle.spec.task == "generate":
        return sharding.model_copy(update={"rows_per_shard": GENERATE_ROWS_PER_SHARD})
    if bundle.spec.modality != "image":
        return sharding
    return sharding.model_copy(update={"rows_per_shard": IMAGE_ROWS_PER_SHARD})


def _read_columns(spec: JobSpec, bundle: LocalBundle) -> list[str]:
    """The input columns the job reads: the task's and the passthrough ones."""
    task = build_task(bundle, spec.task, spec.batching, {})
    if spec.input.columns is None:
        return list(dict.fromkeys([*spec.passthrough, *task.input_columns]))
    missing = [c for c in [*task.input_columns, *spec.passthrough] if c not in spec.input.columns]
    if missing:
        raise ConfigError(f"input.columns: {missing[0]!r} is used by the job but not listed")
    return list(spec.input.columns)


def _plan_incremental(spec: JobSpec, read_columns: list[str], known: dict,
                      listing: Listing) -> tuple[Plan, Increment, RunLog]:
    """The input as listed now against the shards the output holds (see ``increment``)."""
    layout = OutputLayout(spec.output.uri, spec.output.storage_options)
    try:  # never guess: an output read as empty would recompute (and drop) everything
        runs = with_retries(lambda: read_runs(layout), "reading run manifests")
        committed = with_retries(layout.committed_shards, "listing shard markers")
        ledger = runs.ledger()
        if not ledger and committed:  # an output written before runs had manifests
            markers = with_retries(lambda: layout.read_markers(sorted(committed)),
                                   "reading shard markers")
            ledger = shards_from_markers(markers)
    except PipelineError:
        raise
    except Exception as exc:
        raise storage_error(exc, "output.uri", layout.uri, "read the runs of",
                            spec.output.storage_options) from exc
    sh = spec.sharding
    files, sizing = survey(str(spec.input.uri), spec.input.format, spec.input.storage_options,
                           sh.rows_per_shard, read_columns, sh.bytes_per_shard, known,
                           sizing=runs.sizing(sh.rows_per_shard, sh.bytes_per_shard),
                           listed=listing.files, unified=list(spec.passthrough))
    # A shard cut to isolate rows that kill workers is held when its pieces cover it.
    held = [ledger[sid] for sid in sorted(roots_done(ledger, committed))]
    increment = plan_increment(files, sizing, held, spec.output.deleted_inputs == "keep")
    return Plan(increment.shards, files, read_columns, sizing), increment, runs


def replanned_fresh(planned: PlannedJob) -> PlannedJob:
    """--fresh over an incremental output: everything is new (the output was wiped)."""
    plan, sharding = planned.plan, planned.spec.sharding
    sizing = measure_sizing(plan.files, sharding.rows_per_shard, sharding.bytes_per_shard)
    increment = plan_increment(plan.files, sizing, [], False)
    shards = _rows_known(increment.shards, planned.spec.input.filter)
    new_plan = Plan(shards, plan.files, plan.read_columns, sizing)
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
            raise access from exc
        return None


# ----------------------------------------------------------------------------- --dry-run


def _replicas_text(pool: Any, cpus: float | None, shards: int) -> str:
    if pool.replicas != "auto":
        return f"replicas={pool.replicas}"
    bound = min(pool.max_replicas or shards, shards)
    text = f"replicas=auto (as many as the cluster gives, up to {bound}"
    if cpus:  # what a local cluster on this machine would give
        text += f"; {min(bound, max(1, int((os.cpu_count() or 1) // cpus)))} on this machine"
    return text + ")"


def describe_plan(planned: PlannedJob) -> list[str]:
    """The --dry-run text: what would run, where, on which providers."""
    spec, plan = planned.spec, planned.plan
    rows = plan.total_rows
    lines = [
        f"job {spec.name}: {len(plan.files)} files, {len(plan.shards)} shards, "
        f"{rows if rows is not None else 'unknown (footers not read)'} rows, "
        f"{plan.total_bytes / 1e6:.1f} MB",
        f"model {spec.model.uri} (sha256 {planned.bundle.sha256[:12]}…, task {spec.task.kind})",
        *_import_lines(planned),
        f"reads columns: {', '.join(planned.read_columns)}",
    ]
    if planned.table is not None:
        t = planned.table
        lines.append(f"table {t.format} {t.table or t.location}, version {t.version}"
                     + (f"; filter {spec.input.filter}" if spec.input.filter else ""))
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
    lines += _provider_lines(planned)
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


def _import_lines(planned: PlannedJob) -> list[str]:
    """What an import of model.uri inferred (a converter's output, not a bundle)."""
    if not planned.imported:
        return []
    source = planned.bundle.spec.source
    lines = [f"  imported into {planned.bundle.path} ({source.get('layout')})"]
    lines += [f"  {f['key']}: {f['value']} (from {f['from']})" for f in source.get("inferred", [])]
    lines += [f"  repaired: {r}" for r in source.get("repairs", [])]
    lines += [f"  warning: {w}" for w in source.get("warnings", [])]
    return lines


def _provider_lines(planned: PlannedJob) -> list[str]:
    """Which provider each pool would run on here (sessions really created and read back)."""
    spec, lines = planned.spec, []
    for pool, providers in (("cpu", spec.providers.cpu), ("gpu", spec.providers.gpu)):
        if pool == "gpu" and not spec.workers.gpu.replicas:
            continue
        loaded = create_session(str(planned.bundle.model_path),
                                SessionSettings(providers=tuple(providers)))
        note = f" ({loaded.fallback})" if loaded.fallback else ""
        lines.append(f"providers {pool}: asked {', '.join(providers)}; "
                     f"here runs on {loaded.active}{note}")
    return lines

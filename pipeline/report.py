"""The job report (_pipeline/report.json, ``state.JobReport``) and the closing summary, built
from shard markers and the run's outcome."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from pipeline.isolation import root_of, roots_done
from pipeline.models.bundle import LocalBundle
from pipeline.outcome import RunOutcome
from pipeline.plan import Plan
from pipeline.redaction import redact_uri
from pipeline.state import (
    Attempts,
    BadRows,
    Failure,
    Isolated,
    IsolatedRow,
    JobReport,
    NodeFigures,
    PoolFigures,
    RetriedShard,
    RunView,
    ShardMarker,
    TimelinePoint,
    Totals,
    WorkerFigures,
)


@dataclass(frozen=True)
class ReportInputs:
    """What a report is built from besides the markers and the outcome."""

    name: str
    output: str
    plan: Plan
    fingerprint: str
    bundle: LocalBundle
    started_at: float
    max_bad_fraction: float


def build_report(job: ReportInputs, outcome: RunOutcome,
                 earlier: dict[str, ShardMarker]) -> JobReport:
    """The report of a run: ``earlier`` are the markers of shards committed before it."""
    wall = time.time() - job.started_at
    markers = {**earlier, **outcome.markers}
    roots = [s.id for s in job.plan.shards]
    totals = _totals(job, outcome, markers, len(roots_done(roots, earlier)), wall)
    bad_rows = _bad_rows(markers, totals, job.max_bad_fraction)
    exit_code = decide_exit(totals, bad_rows)
    return JobReport(
        job=job.name, output=job.output, fingerprint=job.fingerprint,
        model_sha256=job.bundle.sha256, bundle_identity=job.bundle.identity,
        status="succeeded" if exit_code == 0 else "failed", exit_code=exit_code,
        started_at=job.started_at, finished_at=time.time(), wall_s=round(wall, 3),
        totals=totals, bad_rows=bad_rows, attempts=_attempts(outcome),
        failures=_failures(job.plan, outcome), aborted=outcome.aborted,
        pools=_pools(outcome.markers), workers=_workers(outcome), nodes=_nodes(outcome.markers),
        timeline=_timeline(outcome.markers, job.started_at),
        providers=dict(Counter(m.provider for m in markers.values())),
        fallbacks=sorted({w.fallback for w in outcome.workers if w.fallback}),
        notes=list(outcome.notes), isolation=_isolation(outcome, markers),
        row_notes=_row_notes(markers))


def decide_exit(totals: Totals, bad_rows: BadRows, commit_failure: str | None = None) -> int:
    """The exit code of a job that ran (docs/architecture.md, "Exit codes"): 0 when every
    shard is committed, the bad rows are within budget and the run's table commit (if any)
    went through; 1 otherwise. (2, nothing ran, is raised before a report exists.)"""
    complete = totals.committed == totals.shards and totals.failed == 0
    return 0 if complete and not bad_rows.budget_exceeded and commit_failure is None else 1


def with_commit_failure(report: JobReport, failure: str) -> JobReport:
    """The report of a run whose shards all committed but whose table commit failed."""
    code = decide_exit(report.totals, report.bad_rows, failure)
    return report.model_copy(update={"exit_code": code, "aborted": failure,
                                     "status": "succeeded" if code == 0 else "failed"})


def _totals(job: ReportInputs, outcome: RunOutcome, markers: dict[str, ShardMarker],
            resumed: int, wall: float) -> Totals:
    run_rows = sum(m.rows_in for m in outcome.markers.values())
    first = min((m.committed_at for m in outcome.markers.values()), default=None)
    committed = roots_done([s.id for s in job.plan.shards], markers)
    return Totals(
        shards=len(job.plan.shards), committed=len(committed), resumed=resumed,
        run_now=len(outcome.markers), failed=len(outcome.failed),
        rows_in=sum(m.rows_in for m in markers.values()),
        rows_out=sum(m.rows_out for m in markers.values()),
        rows_bad=sum(m.rows_bad for m in markers.values()),
        rows_per_s=round(run_rows / wall, 1) if wall > 0 else None,
        first_shard_s=round(first - job.started_at, 3) if first is not None else None,
        input_bytes=job.plan.total_bytes)


def _bad_rows(markers: dict[str, ShardMarker], totals: Totals, max_fraction: float) -> BadRows:
    reasons: Counter[str] = Counter()
    for m in markers.values():
        reasons.update(m.bad_reasons)
    fraction = totals.rows_bad / totals.rows_in if totals.rows_in else 0.0
    return BadRows(count=totals.rows_bad, fraction=round(fraction, 6), max_fraction=max_fraction,
                   budget_exceeded=fraction > max_fraction, by_reason=dict(reasons.most_common()))


def _row_notes(markers: dict[str, ShardMarker]) -> dict[str, int]:
    notes: Counter[str] = Counter()
    for m in markers.values():
        notes.update(m.row_notes)
    return dict(notes.most_common())


def _attempts(outcome: RunOutcome) -> Attempts:
    retried = [RetriedShard(shard=sid, attempts=n,
                            errors=[e.message for e in outcome.errors.get(sid, [])],
                            error_types=[e.type for e in outcome.errors.get(sid, [])])
               for sid, n in sorted(outcome.attempts.items()) if n > 1]
    by_type = Counter(e.type for errors in outcome.errors.values() for e in errors)
    return Attempts(total=sum(outcome.attempts.values()), retried_shards=retried,
                    actor_deaths=outcome.actor_deaths, device_errors=outcome.device_errors,
                    errors_by_type=dict(sorted(by_type.items())))


def _isolation(outcome: RunOutcome, markers: dict[str, ShardMarker]) -> Isolated | None:
    """Shards cut to isolate rows that kill workers, and the rows dead-lettered that way."""
    if not outcome.splits:
        return None
    rows = [IsolatedRow(shard=sid, reason=why, committed=sid in markers)
            for sid, why in sorted(outcome.isolated_rows.items())]
    return Isolated(shards=len(outcome.splits),
                    pieces=sum(len(p) for p in outcome.splits.values()), rows=rows)


def _failures(plan: Plan, outcome: RunOutcome) -> list[Failure]:
    shards = {s.id: s for s in plan.shards}
    return [Failure(shard=sid, input=redact_uri(shards[root_of(sid)].uri),
                    pieces=[(redact_uri(p.uri), *p.key()[1:])
                            for p in shards[root_of(sid)].pieces],
                    attempts=outcome.attempts.get(sid, 0), last_error=err,
                    errors=[e.message for e in outcome.errors.get(sid, [])],
                    error_types=[e.type for e in outcome.errors.get(sid, [])])
            for sid, err in sorted(outcome.failed.items())]


def _pools(markers: dict[str, ShardMarker]) -> dict[str, PoolFigures]:
    pools: dict[str, PoolFigures] = {}
    for m in markers.values():
        p = pools.setdefault(m.pool, PoolFigures())
        p.shards += 1
        p.rows += m.rows_in
        p.infer_s += m.timings.infer_s
    for p in pools.values():
        p.infer_s = round(p.infer_s, 3)
        p.rows_per_infer_s = round(p.rows / p.infer_s, 1) if p.infer_s else None
    return pools


def _nodes(markers: dict[str, ShardMarker]) -> list[NodeFigures]:
    """Per Ray node figures for this run: how the work spread across the cluster."""
    per: dict[str, NodeFigures] = {}
    workers: dict[str, set[str]] = {}
    for m in markers.values():
        node = m.node_id or "unknown"
        n = per.setdefault(node, NodeFigures(node_id=node, node_ip=m.node_ip))
        workers.setdefault(node, set()).add(m.worker)
        n.shards += 1
        n.rows += m.rows_in
        n.infer_s += m.timings.infer_s
    for node, n in per.items():
        n.workers = len(workers[node])
        n.infer_s = round(n.infer_s, 3)
        n.rows_per_infer_s = round(n.rows / n.infer_s, 1) if n.infer_s else None
    return sorted(per.values(), key=lambda n: (n.node_ip or "", n.node_id))


def _timeline(markers: dict[str, ShardMarker], started_at: float) -> list[TimelinePoint]:
    """Rows committed over time in this run: one point per shard commit, for plots."""
    points, rows = [], 0
    for m in sorted(markers.values(), key=lambda m: m.committed_at):
        rows += m.rows_in
        points.append(TimelinePoint(t=round(m.committed_at - started_at, 3), rows=rows,
                                    shard=m.shard_id, node_id=m.node_id))
    return points


def _workers(outcome: RunOutcome) -> list[WorkerFigures]:
    per: dict[str, WorkerFigures] = {}
    for w in outcome.workers:
        if w.worker:
            per[w.worker] = w.model_copy(update={"shards": 0, "rows": 0, "read_s": 0.0,
                                                 "infer_s": 0.0, "write_s": 0.0})
    for m in outcome.markers.values():
        w = per.setdefault(m.worker, WorkerFigures(
            worker=m.worker, pool=m.pool, provider=m.provider, fallback=m.fallback,
            node_id=m.node_id, node_ip=m.node_ip, session=m.session))
        w.shards += 1
        w.rows += m.rows_in
        w.read_s = round(w.read_s + m.timings.read_s, 3)
        w.infer_s = round(w.infer_s + m.timings.infer_s, 3)
        w.write_s = round(w.write_s + m.timings.write_s, 3)
    return sorted(per.values(), key=lambda w: (w.pool or "", w.worker or ""))


# ----------------------------------------------------------------------------- the summary


def summary_lines(report: JobReport) -> list[str]:
    t = report.totals
    lines = [
        f"{report.status.upper()}: {t.rows_in:,} rows in {t.committed}/{t.shards} "
        f"shards ({t.resumed} resumed) in {report.wall_s:.1f}s"
        + (f", {t.rows_per_s:,.0f} rows/s" if t.rows_per_s else ""),
        f"  rows out {t.rows_out:,}, dead-lettered {t.rows_bad:,}"
        + (" (over the bad_rows budget)" if report.bad_rows.budget_exceeded else ""),
        "  providers: " + (", ".join(f"{k} ({v} shards)" for k, v in report.providers.items())
                           or "-"),
    ]
    if len(report.nodes) > 1:
        lines.append("  nodes: " + ", ".join(
            f"{n.node_ip}/{n.node_id[:8]} ({n.shards} shards, {n.rows:,} rows)"
            for n in report.nodes))
    sessions = {_session_line(w) for w in report.workers if w.session}
    lines += [f"  session: {line}" for line in sorted(sessions)[:4]]
    lines += [f"  fallback: {fb}" for fb in report.fallbacks]
    attempts = report.attempts
    if attempts.retried_shards:
        lines.append(f"  retried shards: {len(attempts.retried_shards)}, "
                     f"worker losses: {attempts.actor_deaths}, "
                     f"device errors: {attempts.device_errors}")
    if report.isolation:
        iso = report.isolation
        lines.append(f"  isolated: {iso.shards} shard{'s' if iso.shards != 1 else ''} cut into "
                     f"{iso.pieces} pieces to find rows that kill workers; "
                     f"{len(iso.rows)} row{'s' if len(iso.rows) != 1 else ''} dead-lettered")
    lines += [f"  note: {n:,} row{'s' if n != 1 else ''} {note}"
              for note, n in list(report.row_notes.items())[:5]]
    lines += [f"  dead letter: {n} x {reason}"
              for reason, n in list(report.bad_rows.by_reason.items())[:5]]
    lines += [f"  FAILED shard {f.shard} ({f.input}) after {f.attempts} attempts: {f.last_error}"
              for f in report.failures[:10]]
    if report.aborted:
        lines.append(f"  aborted: {report.aborted}")
    if report.run:
        lines.append("  " + run_line(report.run))
    lines.append(f"  output: {report.output}")
    return lines


def run_line(run: RunView) -> str:
    """The run in one line: its id, state, input delta, shards, rows and table version."""
    sh, files = run.shards, run.input_files
    text = f"run {run.run} ({run.mode}, {run.status})"
    if files.changed is not None or files.deleted is not None:
        text += (f": files +{files.new.count if files.new else 0} new, "
                 f"{files.changed.count if files.changed else 0} changed, "
                 f"{files.deleted.count if files.deleted else 0} deleted, "
                 f"{files.unchanged or 0} unchanged")
    text += (f"; shards +{len(sh.added)}, kept {sh.kept}, replaced {len(sh.replaced)}, "
             f"retired {len(sh.retired)}")
    if run.rows:
        text += f"; rows +{run.rows.added:,} -{run.rows.removed:,} = {run.rows.total:,}"
    table = run.table or {}
    if table.get("version") is not None:
        text += f"; {table['format']} version {table['version']}"
    return text


def _session_line(worker: WorkerFigures) -> str:
    """One worker's session set-up in words: pool, provider, threads, graph, batch sizes."""
    s = worker.session or {}
    b = s.get("batching", {})
    threads = s.get("intra_op_threads")
    tokens = f"{b['max_tokens']} tokens / " if b.get("max_tokens") else ""
    if s.get("runtime") == "onnxruntime-genai":
        return (f"{worker.pool} pool on onnxruntime-genai ({s.get('provider')}), loaded in "
                f"{s.get('load_s')} s, batches of {tokens}{b.get('max_rows')} rows")
    return (f"{worker.pool} pool on {', '.join(s.get('providers', [])[:1]) or '?'}, "
            f"{threads} intra-op thread{'s' if threads != 1 else ''}, graph {s.get('graph')}, "
            f"batches of {tokens}{b.get('max_rows')} rows")

"""The job report (_pipeline/report.json) and the closing summary, built from shard markers."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from typing import Any

from pipeline.commit import OutputLayout
from pipeline.errors import is_device_error
from pipeline.models.bundle import LocalBundle
from pipeline.plan import Plan
from pipeline.redaction import redact_uri
from pipeline.runner import RunOutcome


def read_markers(layout: OutputLayout, shard_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Markers of shards committed by earlier runs, fetched concurrently where fsspec can."""
    if not shard_ids:
        return {}
    paths = [layout.marker_path(s) for s in shard_ids]
    blobs = layout.fs.cat(paths, on_error="raise")
    return {p.rsplit("/", 1)[-1][:-5]: json.loads(b) for p, b in blobs.items()}


def build_report(*, name: str, layout: OutputLayout, plan: Plan, fingerprint: str,
                 bundle: LocalBundle, outcome: RunOutcome, earlier: dict[str, dict[str, Any]],
                 started_at: float, max_bad_fraction: float) -> dict[str, Any]:
    wall = time.time() - started_at
    markers = {**earlier, **outcome.markers}
    rows_in = sum(m["rows_in"] for m in markers.values())
    rows_out = sum(m["rows_out"] for m in markers.values())
    rows_bad = sum(m["rows_bad"] for m in markers.values())
    run_rows = sum(m["rows_in"] for m in outcome.markers.values())
    reasons: Counter[str] = Counter()
    for m in markers.values():
        reasons.update(m.get("bad_reasons", {}))
    bad_fraction = rows_bad / rows_in if rows_in else 0.0
    budget_exceeded = bad_fraction > max_bad_fraction
    shards = {s.id: s for s in plan.shards}
    failures = [
        {"shard": sid, "input": redact_uri(shards[sid].uri),
         "pieces": [[redact_uri(p.uri), *p.key()[1:]] for p in shards[sid].pieces],
         "attempts": outcome.attempts.get(sid, 0), "last_error": err,
         "errors": outcome.errors.get(sid, [])}
        for sid, err in sorted(outcome.failed.items())
    ]
    retried = [
        {"shard": sid, "attempts": n, "errors": outcome.errors.get(sid, [])}
        for sid, n in sorted(outcome.attempts.items()) if n > 1
    ]
    complete = len(markers) == len(plan.shards) and not outcome.failed
    exit_code = 0 if complete and not budget_exceeded else 1
    return {
        "job": name,
        "output": layout.uri,
        "fingerprint": fingerprint,
        "model_sha256": bundle.sha256,
        "bundle_identity": bundle.identity,
        "status": "succeeded" if exit_code == 0 else "failed",
        "exit_code": exit_code,
        "started_at": started_at,
        "finished_at": time.time(),
        "wall_s": round(wall, 3),
        "totals": {
            "shards": len(plan.shards),
            "committed": len(markers),
            "resumed": len(earlier),
            "run_now": len(outcome.markers),
            "failed": len(outcome.failed),
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_bad": rows_bad,
            "rows_per_s": round(run_rows / wall, 1) if wall > 0 else None,
            # Start-up cost as users feel it: Ray, planning, model load, first shard.
            "first_shard_s": round(min(m["committed_at"] for m in outcome.markers.values())
                                   - started_at, 3) if outcome.markers else None,
            "input_bytes": plan.total_bytes,
        },
        "bad_rows": {
            "count": rows_bad, "fraction": round(bad_fraction, 6),
            "max_fraction": max_bad_fraction, "budget_exceeded": budget_exceeded,
            "by_reason": dict(reasons.most_common()),
        },
        "attempts": {"total": sum(outcome.attempts.values()), "retried_shards": retried,
                     "actor_deaths": outcome.actor_deaths,
                     "device_errors": sum(is_device_error(e) for errors in outcome.errors.values()
                                          for e in errors)},
        "failures": failures,
        "aborted": outcome.aborted,
        "pools": _pools(outcome.markers),
        "workers": _workers(outcome),
        "nodes": _nodes(outcome.markers),
        "timeline": _timeline(outcome.markers, started_at),
        "providers": dict(Counter(m["provider"] for m in markers.values())),
        "fallbacks": sorted({w["fallback"] for w in outcome.workers if w.get("fallback")}),
        "notes": outcome.notes,
    }


def _pools(markers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pools: dict[str, dict[str, Any]] = defaultdict(lambda: {"shards": 0, "rows": 0, "infer_s": 0.0})
    for m in markers.values():
        p = pools[m["pool"]]
        p["shards"] += 1
        p["rows"] += m["rows_in"]
        p["infer_s"] += m["timings"]["infer_s"]
    for p in pools.values():
        p["infer_s"] = round(p["infer_s"], 3)
        p["rows_per_infer_s"] = round(p["rows"] / p["infer_s"], 1) if p["infer_s"] else None
    return dict(pools)


def _nodes(markers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Ray node figures for this run: how the work spread across the cluster."""
    per: dict[str, dict[str, Any]] = {}
    for m in markers.values():
        node = m.get("node_id") or "unknown"
        n = per.setdefault(node, {"node_id": node, "node_ip": m.get("node_ip"), "workers": set(),
                                  "shards": 0, "rows": 0, "infer_s": 0.0})
        n["workers"].add(m["worker"])
        n["shards"] += 1
        n["rows"] += m["rows_in"]
        n["infer_s"] += m["timings"]["infer_s"]
    for n in per.values():
        n["workers"] = len(n["workers"])
        n["infer_s"] = round(n["infer_s"], 3)
        n["rows_per_infer_s"] = round(n["rows"] / n["infer_s"], 1) if n["infer_s"] else None
    return sorted(per.values(), key=lambda n: (n["node_ip"] or "", n["node_id"]))


def _timeline(markers: dict[str, dict[str, Any]], started_at: float) -> list[dict[str, Any]]:
    """Rows committed over time in this run: one point per shard commit, for plots."""
    points, rows = [], 0
    for m in sorted(markers.values(), key=lambda m: m["committed_at"]):
        rows += m["rows_in"]
        points.append({"t": round(m["committed_at"] - started_at, 3), "rows": rows,
                       "shard": m["shard_id"], "node_id": m.get("node_id")})
    return points


def _workers(outcome: RunOutcome) -> list[dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {}
    for w in outcome.workers:
        if w.get("worker"):
            per[w["worker"]] = {**w, "shards": 0, "rows": 0, "read_s": 0.0, "infer_s": 0.0,
                                "write_s": 0.0}
    for m in outcome.markers.values():
        w = per.setdefault(m["worker"], {"worker": m["worker"], "pool": m["pool"],
                                         "provider": m["provider"], "fallback": m["fallback"],
                                         "node_id": m.get("node_id"), "node_ip": m.get("node_ip"),
                                         "session": m.get("session"), "shards": 0, "rows": 0, "read_s": 0.0,
                                         "infer_s": 0.0, "write_s": 0.0})
        w["shards"] += 1
        w["rows"] += m["rows_in"]
        for k in ("read_s", "infer_s", "write_s"):
            w[k] = round(w[k] + m["timings"][k], 3)
    return sorted(per.values(), key=lambda w: (w["pool"] or "", w["worker"] or ""))


def summary_lines(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    lines = [
        f"{report['status'].upper()}: {t['rows_in']:,} rows in {t['committed']}/{t['shards']} "
        f"shards ({t['resumed']} resumed) in {report['wall_s']:.1f}s"
        + (f", {t['rows_per_s']:,.0f} rows/s" if t["rows_per_s"] else ""),
        f"  rows out {t['rows_out']:,}, dead-lettered {t['rows_bad']:,}"
        + (" (over the bad_rows budget)" if report["bad_rows"]["budget_exceeded"] else ""),
        f"  providers: {', '.join(f'{k} ({v} shards)' for k, v in report['providers'].items()) or '-'}",
    ]
    if len(report["nodes"]) > 1:
        lines.append("  nodes: " + ", ".join(
            f"{n['node_ip']}/{n['node_id'][:8]} ({n['shards']} shards, {n['rows']:,} rows)"
            for n in report["nodes"]))
    sessions = {_session_line(w) for w in report["workers"] if w.get("session")}
    for line in sorted(sessions)[:4]:
        lines.append(f"  session: {line}")
    for fb in report["fallbacks"]:
        lines.append(f"  fallback: {fb}")
    if report["attempts"]["retried_shards"]:
        lines.append(f"  retried shards: {len(report['attempts']['retried_shards'])}, "
                     f"worker losses: {report['attempts']['actor_deaths']}, "
                     f"device errors: {report['attempts']['device_errors']}")
    for reason, n in list(report["bad_rows"]["by_reason"].items())[:5]:
        lines.append(f"  dead letter: {n} x {reason}")
    for f in report["failures"][:10]:
        lines.append(f"  FAILED shard {f['shard']} ({f['input']}) after {f['attempts']} "
                     f"attempts: {f['last_error']}")
    if report.get("aborted"):
        lines.append(f"  aborted: {report['aborted']}")
    if report.get("run"):
        lines.append("  " + run_line(report["run"]))
    lines.append(f"  output: {report['output']}")
    return lines


def run_line(run: dict[str, Any]) -> str:
    """The run in one line: its id, state, input delta, shards, rows and table version."""
    sh, files = run.get("shards", {}), run.get("input_files", {})
    text = f"run {run['run']} ({run.get('mode')}, {run.get('status')})"
    if files and any(k in files for k in ("changed", "deleted")):
        text += (f": files +{files['new']['count']} new, {files['changed']['count']} changed, "
                 f"{files['deleted']['count']} deleted, {files['unchanged']} unchanged")
    text += (f"; shards +{len(sh.get('added', []))}, kept {sh.get('kept', 0)}, "
             f"replaced {len(sh.get('replaced', []))}, retired {len(sh.get('retired', []))}")
    rows = run.get("rows")
    if rows:
        text += f"; rows +{rows['added']:,} -{rows['removed']:,} = {rows['total']:,}"
    table = run.get("table") or {}
    if table.get("version") is not None:
        text += f"; {table['format']} version {table['version']}"
    return text


def _session_line(worker: dict[str, Any]) -> str:
    """One worker's session set-up in words: pool, provider, threads, graph, batch sizes."""
    s = worker["session"]
    b = s.get("batching", {})
    threads = s.get("intra_op_threads")
    return (f"{worker.get('pool')} pool on {', '.join(s.get('providers', [])[:1]) or '?'}, "
            f"{threads} intra-op thread{'s' if threads != 1 else ''}, graph {s.get('graph')}, "
            f"batches of {b.get('max_tokens')} tokens / {b.get('max_rows')} rows")

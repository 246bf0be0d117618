"""Live job metrics: a real job on the shared Ray cluster, read back from the node's Prometheus
endpoint (the metrics agent), plus the rate window and the no-op fallbacks without a cluster."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import metrics as metrics_mod
from pipeline.demo.tabular import make_scoring_table
from pipeline.metrics import RATE_WINDOW_S, SHARD_SECONDS_BOUNDARIES, TICK_S, JobMetrics

FILES, ROWS_PER_FILE, ROWS_PER_SHARD = 3, 100, 50
SHARDS = FILES * ROWS_PER_FILE // ROWS_PER_SHARD
EXPORT_WAIT_S = 40.0  # Ray reports every 10 s by default; bounded, never hit when all is well

NAMES = ["rows_total", "dead_letter_rows_total", "shards_committed_total",
         "shard_retries_total", "shards_failed_total", "provider_fallbacks_total",
         "shard_seconds_count", "shard_seconds_sum", "shard_seconds_bucket",
         "shards_in_flight", "rows_per_second"]


def write_input(folder: Path) -> None:
    """FILES files of ROWS_PER_FILE rows; the first row of every shard has a null feature."""
    folder.mkdir(parents=True)
    for i in range(FILES):
        table = make_scoring_table(ROWS_PER_FILE, seed=i, start_id=i * ROWS_PER_FILE)
        radius = table["mean_radius"].to_pylist()
        for r in range(0, ROWS_PER_FILE, ROWS_PER_SHARD):
            radius[r] = None
        table = table.set_column(table.schema.get_field_index("mean_radius"), "mean_radius",
                                 pa.array(radius, pa.float64()))
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=ROWS_PER_SHARD)


def metrics_port() -> int:
    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    return int(node["MetricsExportPort"])


def scrape(port: int, job: str) -> dict[str, dict[tuple, float]]:
    """``name`` (without the ray_pipeline_ prefix) -> {labels: value}, summed over Ray's own
    labels (WorkerId, SessionName, ...), for this job only."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("ray_pipeline_") or s.labels.get("job") != job:
                continue
            keep = tuple(sorted((k, v) for k, v in s.labels.items()
                                if k in ("pool", "requested", "active", "le")))
            out[s.name.removeprefix("ray_pipeline_")][keep] += s.value
    return out


def total(scraped: dict, name: str) -> float:
    return sum(scraped.get(name, {}).values())


@pytest.mark.usefixtures("ray_cluster")
def test_job_metrics_reach_prometheus(tmp_path, monkeypatch, breast_cancer_dir):
    write_input(tmp_path / "in")
    # One shard fails its first attempt transiently (a retry); another fails for good.
    monkeypatch.setenv("PIPELINE_FAULTS", json.dumps([
        {"point": "worker.start", "action": "transient", "attempt": 1,
         "once_file": str(tmp_path / "retried")},
        {"point": "worker.start", "action": "raise", "once_file": str(tmp_path / "failed")}]))
    job = f"metrics-{uuid.uuid4().hex[:8]}"  # the agent keeps counters for the whole session
    result = pipeline.run_job({
        "name": job,
        "input": {"uri": str(tmp_path / "in")},
        "model": {"uri": str(breast_cancer_dir)},
        "task": {"kind": "classify"},
        "passthrough": ["id"],
        "sharding": {"rows_per_shard": ROWS_PER_SHARD},
        # A GPU pool: where CUDA cannot load (no GPU here) its worker falls back to the CPU.
        "workers": {"cpu": {"replicas": 1}, "gpu": {"replicas": 1}},
        "retry": {"max_attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2},
        "bad_rows": {"max_fraction": 0.5},
        "output": {"uri": str(tmp_path / "out")},
    }, progress=False)
    monkeypatch.delenv("PIPELINE_FAULTS")
    report = result.report
    assert result.exit_code == 1 and report["totals"]["failed"] == 1, report["failures"]
    committed = report["totals"]["committed"]
    assert committed == SHARDS - 1
    rows = committed * ROWS_PER_SHARD
    assert report["totals"]["rows_in"] == rows and report["totals"]["rows_bad"] == committed
    fallbacks = [w for w in report["workers"] if w.get("fallback")]

    port = metrics_port()

    def complete(s: dict) -> bool:
        return (total(s, "rows_total") == rows and total(s, "shard_seconds_count") == committed
                and total(s, "shards_failed_total") == 1
                and total(s, "provider_fallbacks_total") == len(fallbacks)
                and "shards_in_flight" in s and total(s, "shards_in_flight") == 0
                and "rows_per_second" in s)

    deadline = time.monotonic() + EXPORT_WAIT_S
    scraped = scrape(port, job)
    while not complete(scraped) and time.monotonic() < deadline:
        time.sleep(0.5)
        scraped = scrape(port, job)

    assert total(scraped, "rows_total") == rows, dict(scraped)
    # Rows by pool agree with the markers' pools (report.json, rows_in per pool).
    assert {dict(k)["pool"]: v for k, v in scraped["rows_total"].items()} == \
        {p: float(v["rows"]) for p, v in report["pools"].items()}
    assert total(scraped, "dead_letter_rows_total") == report["totals"]["rows_bad"] == committed
    assert total(scraped, "shards_committed_total") == committed
    assert total(scraped, "shard_retries_total") == 1
    assert total(scraped, "shards_failed_total") == 1
    # Histogram: one observation per committed shard, cumulative buckets from 0.1 s to 1 h.
    assert total(scraped, "shard_seconds_count") == committed
    assert total(scraped, "shard_seconds_sum") > 0
    buckets = defaultdict(float)
    for key, value in scraped["shard_seconds_bucket"].items():
        buckets[float(dict(key)["le"])] += value
    assert sorted(buckets) == [*SHARD_SECONDS_BOUNDARIES, float("inf")]
    counts = [buckets[b] for b in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] == committed
    # Provider fallbacks, tagged with what was asked for and what runs.
    if fallbacks:
        assert dict(scraped["provider_fallbacks_total"]) == {
            (("active", "cpu"), ("pool", "gpu"), ("requested", "cuda")): float(len(fallbacks))}
    else:
        assert "provider_fallbacks_total" not in scraped
    # Gauges after the run: nothing in flight in either pool, no rate.
    assert {dict(k)["pool"] for k in scraped["shards_in_flight"]} == {"cpu", "gpu"}, dict(scraped)
    assert total(scraped, "shards_in_flight") == 0
    assert list(scraped["rows_per_second"].values()) == [0.0]
    expected = [n for n in NAMES if fallbacks or n != "provider_fallbacks_total"]
    assert [n for n in expected if n not in scraped] == []


def test_rate_is_rows_over_the_recent_window():
    now = [100.0]
    m = JobMetrics("rate", clock=lambda: now[0])
    assert m.rate() == 0.0
    now[0] = 102.0
    m.shard_committed("cpu", 100, 0, 2.0)
    assert m.rate() == pytest.approx(50.0)  # the first seconds: rows since the start
    now[0] = 108.0
    m.shard_committed("cpu", 300, 0, 2.0)
    assert m.rate() == pytest.approx(400 / 8)
    now[0] = 115.0
    assert m.rate() == pytest.approx(300 / RATE_WINDOW_S)  # the first commit left the window
    now[0] = 130.0
    assert m.rate() == 0.0


class _Fake:
    """An instrument that records its calls, or raises on every call."""

    def __init__(self, calls: list, fail: bool = False) -> None:
        self.calls, self.fail = calls, fail

    def __getattr__(self, method):
        def record(value, tags=None):
            if self.fail:
                raise RuntimeError("metrics backend gone")
            self.calls.append((method, value, tags))
        return record


def fake_instruments(fail: bool = False):
    calls: dict[str, list] = defaultdict(list)
    return calls, (lambda: {name: _Fake(calls[name], fail) for name in (
        "rows", "dead_letter_rows", "shards_committed", "retries", "shards_failed",
        "fallbacks", "shard_seconds", "in_flight", "rows_per_second")})


def test_tick_refreshes_gauges_at_most_every_tick_s(monkeypatch):
    calls, instruments = fake_instruments()
    monkeypatch.setattr(metrics_mod, "_instruments", instruments)
    now = [0.0]
    asked = []
    m = JobMetrics("tick", clock=lambda: now[0])
    m.tick(lambda: asked.append(1) or {"cpu": 2, "gpu": 1})
    m.tick(lambda: asked.append(1) or {"cpu": 9})  # within TICK_S: in_flight is not called
    assert len(asked) == 1
    now[0] = TICK_S
    m.tick(lambda: asked.append(1) or {"cpu": 1})  # gpu drained: its gauge goes to 0
    assert len(asked) == 2
    assert calls["in_flight"] == [
        ("set", 2.0, {"job": "tick", "pool": "cpu"}), ("set", 1.0, {"job": "tick", "pool": "gpu"}),
        ("set", 1.0, {"job": "tick", "pool": "cpu"}), ("set", 0.0, {"job": "tick", "pool": "gpu"})]
    m.worker_fallback("gpu", "cuda", "cpu")
    assert calls["fallbacks"] == [("inc", 1, {"job": "tick", "pool": "gpu", "requested": "cuda",
                                             "active": "cpu"})]
    m.shard_committed("cpu", 0, 0, 0.5)  # an empty shard: no zero increments (Ray refuses them)
    assert calls["rows"] == [] and calls["shards_committed"] == [("inc", 1, {"job": "tick",
                                                                            "pool": "cpu"})]
    m.finish()
    assert calls["in_flight"][-2:] == [("set", 0.0, {"job": "tick", "pool": "cpu"}),
                                       ("set", 0.0, {"job": "tick", "pool": "gpu"})]
    assert calls["rows_per_second"][-1] == ("set", 0.0, {"job": "tick"})


def test_metrics_never_break_a_job(monkeypatch):
    def unavailable():
        raise ImportError("no ray.util.metrics")

    monkeypatch.setattr(metrics_mod, "_instruments", unavailable)
    off = JobMetrics("off")
    assert not off.enabled
    off.shard_committed("cpu", 10, 1, 0.5)
    off.tick(lambda: {"cpu": 1})
    off.finish()

    _, instruments = fake_instruments(fail=True)
    monkeypatch.setattr(metrics_mod, "_instruments", instruments)
    broken = JobMetrics("broken")
    assert broken.enabled
    broken.shard_committed("cpu", 10, 1, 0.5)  # raises inside: metrics switch off, no error
    assert not broken.enabled
    broken.shard_retried("cpu")
    broken.tick(lambda: {"cpu": 1})
    broken.finish()

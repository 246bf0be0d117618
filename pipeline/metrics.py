"""Live job metrics for the Ray dashboard and Prometheus/Grafana, through ``ray.util.metrics``.

The runner (driver) calls one ``JobMetrics`` per run; every metric carries the tag ``job``
(spec.name) and, where it means something, ``pool`` (cpu or gpu). Ray prefixes exported names
with ``ray_``, so Prometheus shows e.g. ``ray_pipeline_rows_total{job="embed",pool="cpu"}``.

    pipeline_rows_total                Counter    job, pool   rows of committed shards (read:
                                                              scored plus dead-lettered)
    pipeline_dead_letter_rows_total    Counter    job, pool   rows written to dead letters
    pipeline_shards_committed_total    Counter    job, pool   shards committed
    pipeline_shard_retries_total       Counter    job, pool   failed attempts that will be
                                                              retried (errors, lost workers)
    pipeline_shards_failed_total       Counter    job, pool   shards failed after all attempts
    pipeline_provider_fallbacks_total  Counter    job, pool,  workers whose session runs on
                                                  requested,  another provider than the one
                                                  active      asked for (e.g. cuda -> cpu)
    pipeline_shard_seconds             Histogram  job, pool   a committed shard's latency,
                                                              dispatch to result (0.1 s - 1 h)
    pipeline_shards_in_flight          Gauge      job, pool   shards dispatched, no result yet
    pipeline_rows_per_second           Gauge      job         rows committed over the last
                                                              ``RATE_WINDOW_S`` seconds

Counters appear once first incremented (Ray cannot export a zero counter): a job without
retries shows no ``pipeline_shard_retries_total`` series. Counter series also carry Ray's own
labels (``WorkerId`` of the driver, ``SessionName``, ...), so sum by ``job`` across runs. The
in-flight gauge starts at 0 for each of the job's pools; at the end of a run both gauges are set
to 0, so that a long-lived driver (a notebook) does not show a stale rate. The rate counts a
shard's rows when it commits, so it is jagged where shards take longer than the window. The
histogram's ``_sum`` is approximate: Ray's agent rebuilds histograms from bucket counts and
bucket midpoints.

Export timing: a process records into its core worker, which sends its metrics to the node's
metrics agent every ``metrics_report_interval_ms`` (10 s by default in Ray 2.60; Ray's sample
Prometheus config scrapes every 10 s too); Prometheus scrapes the agent (``MetricsExportPort``
in ``ray.nodes()``). A driver flushes its metrics when it disconnects (``ray.shutdown`` or
process exit), so the last values of a short job reach the agent even when the job ends
between two reports; the agent keeps counters for the rest of its life and drops a gauge 2
intervals after its last report. Nothing is therefore needed for correctness, and the
pipeline does not change the interval. Two caveats:

- A job that starts its own local Ray (no ``--address``/``RAY_ADDRESS``) takes the agent down
  with it at the end: Prometheus keeps only what it scraped while the job ran. Run against a
  long-lived cluster (``RAY_ADDRESS=auto``, ``ray job submit``) to keep the final values.
- Finer live resolution is a cluster setting, not a job setting: ``ray start --head
  --system-config='{"metrics_report_interval_ms": 2000}'`` (or ``RAY_metrics_report_interval_ms``
  in the environment of ``ray start``/``ray.init`` that starts the cluster, or
  ``ray.init(_system_config=...)``); a driver that joins a running cluster cannot change it
  (``ray.init`` refuses ``_system_config`` there).

Metrics never break or slow a job: without Ray metrics (import or creation fails) every call
is a no-op, a failing record call is logged once and switches metrics off, and a call costs a
few microseconds (about 2.5 us per counter increment, measured). Records made in a process that
is not connected as a Ray worker are dropped silently (seen before ``ray.init``; a Ray Client
``ray://`` driver is expected to behave the same, untested).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0  # rows/s over this many recent seconds (Ray's default report interval)
TICK_S = 1.0  # the gauges are refreshed at most this often by tick()
SHARD_SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                            600.0, 1200.0, 1800.0, 3600.0]


class JobMetrics:
    """Metrics of one run of a job; the runner calls it, it never looks into the runner."""

    def __init__(self, job_name: str, pools: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.job = str(job_name)
        self.clock = clock
        self.started = clock()
        self._recent: deque[tuple[float, int]] = deque()  # (when, rows) committed recently
        self._recent_rows = 0
        self._pools: set[str] = set(pools)  # the job's pools and any that had shards in flight
        self._next_tick = 0.0
        self._m: dict[str, Any] | None = None
        try:
            self._m = _instruments()
        except Exception as exc:  # no Ray metrics here: every call is a no-op
            log.debug("job metrics off: %s", exc)
        if self._m is not None:  # every pool's series exists from the start, at 0
            with self._guard():
                self._set_in_flight({})

    @property
    def enabled(self) -> bool:
        return self._m is not None

    # ------------------------------------------------------------------ events

    def shard_committed(self, pool: str, rows: int, bad_rows: int, seconds: float) -> None:
        """A shard committed (counted once, whichever attempt reported it)."""
        m, tags = self._m, self._tags(pool)
        if m is None:
            return
        now = self.clock()
        if rows > 0:
            self._recent.append((now, rows))
            self._recent_rows += rows
        with self._guard():
            m["shards_committed"].inc(1, tags)
            if rows > 0:  # a counter takes only positive increments
                m["rows"].inc(rows, tags)
            if bad_rows > 0:
                m["dead_letter_rows"].inc(bad_rows, tags)
            m["shard_seconds"].observe(max(0.0, float(seconds)), tags)
        self._set_rate(now)

    def shard_retried(self, pool: str) -> None:
        """An attempt failed (error or lost worker) and the shard will be tried again."""
        self._inc("retries", pool)

    def shard_failed(self, pool: str) -> None:
        """A shard failed after all its attempts."""
        self._inc("shards_failed", pool)

    def worker_fallback(self, pool: str, provider_asked: str, provider_used: str) -> None:
        """A worker's session runs on another provider than the one asked for."""
        self._inc("fallbacks", pool, requested=str(provider_asked), active=str(provider_used))

    def tick(self, in_flight: Callable[[], Mapping[str, int]]) -> None:
        """Called on every pass of the dispatch loop; at most every ``TICK_S`` it refreshes the
        rate and the in-flight gauge. ``in_flight`` (pool -> shards) is called only then."""
        now = self.clock()
        if self._m is None or now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        self._set_rate(now)
        if self._m is None:
            return
        with self._guard():
            self._set_in_flight(dict(in_flight()))

    def finish(self) -> None:
        """The run is over: nothing in flight, no rate."""
        if self._m is None:
            return
        with self._guard():
            self._set_in_flight({})
            self._m["rows_per_second"].set(0.0, {"job": self.job})

    def rate(self, now: float | None = None) -> float:
        """Rows per second committed over the last ``RATE_WINDOW_S`` seconds (or since the
        start, in the first seconds of a run)."""
        now = self.clock() if now is None else now
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW_S:
            self._recent_rows -= self._recent.popleft()[1]
        span = min(RATE_WINDOW_S, now - self.started)
        return self._recent_rows / span if span > 0 else 0.0

    # ------------------------------------------------------------------ internals

    def _tags(self, pool: str) -> dict[str, str]:
        return {"job": self.job, "pool": str(pool)}

    def _inc(self, name: str, pool: str, **extra: str) -> None:
        if self._m is None:
            return
        with self._guard():
            self._m[name].inc(1, {**self._tags(pool), **extra})

    def _set_rate(self, now: float) -> None:
        if self._m is None:
            return
        with self._guard():
            self._m["rows_per_second"].set(self.rate(now), {"job": self.job})

    def _set_in_flight(self, counts: dict[str, int]) -> None:
        self._pools.update(counts)
        for pool in sorted(self._pools):
            self._m["in_flight"].set(float(counts.get(pool, 0)), self._tags(pool))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # never let metrics break a job: switch them off
            log.warning("job metrics off after an error: %s", exc)
            self._m = None


def _instruments() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    pool = ("job", "pool")
    return {
        "rows": Counter("pipeline_rows_total", tag_keys=pool, description=(
            "Rows of committed shards (scored plus dead-lettered).")),
        "dead_letter_rows": Counter("pipeline_dead_letter_rows_total", tag_keys=pool,
                                    description="Rows written to dead-letter files."),
        "shards_committed": Counter("pipeline_shards_committed_total", tag_keys=pool,
                                    description="Shards committed (marker written)."),
        "retries": Counter("pipeline_shard_retries_total", tag_keys=pool, description=(
            "Failed shard attempts that will be retried (errors and lost workers).")),
        "shards_failed": Counter("pipeline_shards_failed_total", tag_keys=pool,
                                 description="Shards that failed after all attempts."),
        "fallbacks": Counter(
            "pipeline_provider_fallbacks_total", tag_keys=(*pool, "requested", "active"),
            description="Workers whose session runs on another execution provider than the "
                        "one asked for (e.g. cuda -> cpu)."),
        "shard_seconds": Histogram(
            "pipeline_shard_seconds", boundaries=SHARD_SECONDS_BOUNDARIES, tag_keys=pool,
            description="Latency of a committed shard from dispatch to result, in seconds."),
        "in_flight": Gauge("pipeline_shards_in_flight", tag_keys=pool,
                           description="Shards dispatched to workers and not answered yet."),
        "rows_per_second": Gauge("pipeline_rows_per_second", tag_keys=("job",), description=(
            f"Rows committed per second over the last {RATE_WINDOW_S:g} seconds.")),
    }


__all__ = ["JobMetrics"]

"""The worker: a Ray actor that reads a shard, runs the task, writes the part file and marker.

Sessions and tasks are attributes of the worker, created inside its process (never pickled).
Up to ``max_in_flight`` calls run in threads at once: one thread infers (a lock keeps the
session to one caller, whose intra-op threads use the actor's CPUs) while others read or
write, so I/O overlaps with inference. A shard streams through in windows of
``batching.window_rows`` rows: read, tokenize and sort, infer, append to the part file.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import providers
from pipeline.commit import ShardWriter
from pipeline.dead_letters import dead_letter_table
from pipeline.errors import ModelError, OutOfMemory, ShardError, classify_io_error, one_line
from pipeline.faults import maybe_inject, maybe_inject_rows
from pipeline.formats import windows
from pipeline.inference import score_table
from pipeline.layout import OutputLayout
from pipeline.metadata import part_metadata
from pipeline.models.bundle import IMAGE_SOURCE, LocalBundle, default_cache_dir, fetch_bundle
from pipeline.models.shipping import ShippedBundle, install_bundle
from pipeline.plan import Shard
from pipeline.pools import PoolSettings
from pipeline.redaction import redact_uri
from pipeline.sessions import SessionCache, SessionSettings
from pipeline.shard_rows import PIECE_COLUMN, shard_tables
from pipeline.sinks import sink_for
from pipeline.spec import JobSpec
from pipeline.state import ShardMarker, ShardResult, Superseded, Timings, WorkerFigures
from pipeline.tasks import Task, build_task
from pipeline.tasks.chunking import explode


def session_settings(spec: JobSpec, pool: PoolSettings, bundle: LocalBundle) -> SessionSettings:
    """How this worker's session is set up. CPU pools: one intra-op thread per reserved CPU,
    spinning on, the optimized graph cached per node. GPU pools: the device Ray assigned, CUDA
    and TensorRT options tuned for batch work (``pipeline.providers``), spinning off."""
    user = spec.providers.options
    if pool.name == "gpu":
        device_id = providers.assigned_gpu_device_id()
        options = providers.provider_options(pool.providers, user, device_id,
                                             _tensorrt_context(spec, pool, bundle, device_id))
        if "tensorrt" in options:
            providers.make_cache_dirs(options["tensorrt"])
    else:
        options = {p: dict(user.get(p, {})) for p in pool.providers}
    return SessionSettings(
        providers=pool.providers,
        provider_options=tuple((p, tuple(sorted(options.get(p, {}).items())))
                               for p in pool.providers),
        intra_op_threads=pool.threads,
        config=tuple(sorted(providers.session_config(pool.providers).items())),
        # A saved optimized graph would need its external weights saved too: not cached.
        optimized_cache_dir=None if bundle.spec.external_data else str(default_cache_dir()))


def _tensorrt_context(spec: JobSpec, pool: PoolSettings, bundle: LocalBundle,
                      device_id: int) -> providers.TensorrtContext | None:
    """Engine caches on this node's disk and profile shapes from the GPU batch sizes: without
    explicit shapes TensorRT builds a new engine for every new batch shape."""
    if "tensorrt" not in pool.providers:
        return None
    text = bundle.spec.text
    batching = spec.batching.for_device("gpu", bundle.spec.modality)
    shapes = providers.graph_input_shapes(bundle.model_path)
    if bundle.spec.image is not None and not bundle.spec.image.any_size:
        # the pixels' shape is the bundle's, whatever the graph says
        shapes.update({name: (None, *bundle.spec.image.pixel_shape)
                       for name, role in bundle.spec.inputs.items() if role == IMAGE_SOURCE})
    return providers.TensorrtContext(
        cache_dir=providers.tensorrt_cache_dir(default_cache_dir(), bundle.sha256,
                                               providers.gpu_name(device_id)),
        roles=bundle.spec.inputs, shapes=shapes,
        max_rows=batching.max_rows, max_tokens=batching.max_tokens,
        max_length=text.max_length if text else None)


def ray_node() -> dict[str, str | None]:
    """The Ray node this process runs on (None outside Ray), for markers and the report."""
    import ray

    if not ray.is_initialized():
        return {"node_id": None, "node_ip": None}
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


class ShardWorker:
    def __init__(self, spec: JobSpec, fingerprint: str, read_columns: list[str],
                 pool: PoolSettings, shipped_bundle: ShippedBundle | None = None,
                 bundle_identity: str | None = None) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.read_columns = read_columns
        self.pool = pool
        self.layout = OutputLayout(spec.output.uri, spec.output.storage_options)
        self.sink = sink_for(spec.output.format, spec.output)
        # A bundle only the driver can read arrives through the object store.
        self.bundle = install_bundle(shipped_bundle) if shipped_bundle else \
            fetch_bundle(spec.model.uri, spec.model.storage_options, spec.model.sha256)
        if bundle_identity and self.bundle.identity != bundle_identity:
            raise ModelError(f"model bundle {spec.model.uri} changed since the job was planned "
                             f"(identity {self.bundle.identity[:12]}, planned "
                             f"{bundle_identity[:12]}); rerun the job")
        self.sessions = SessionCache()
        self.loaded = self.sessions.get(str(self.bundle.model_path), self.bundle.sha256,
                                        session_settings(spec, pool, self.bundle),
                                        self.bundle.spec.runtime)
        types = {i.name: i.type for i in self.loaded.session.get_inputs()}
        # Batch sizes follow the provider that runs, not the one asked for: a GPU pool that
        # fell back to the CPU batches as the CPU likes.
        self.task = build_task(self.bundle, spec.task, spec.batching, types, self.loaded.active,
                               spec.input.storage_options)
        b = self.task.batching
        # Recorded in every marker and the report: how this worker's session really runs.
        # max_tokens only where rows have tokens: it means nothing to an image or a table.
        tokens = {"max_tokens": b.max_tokens} if self.bundle.spec.modality == "text" else {}
        self.tuning = {**self.loaded.tuning, "batching": {
            **tokens, "max_rows": b.max_rows, "window_rows": b.window_rows}}
        self.infer_lock = threading.Lock()
        self.identity = f"{pool.name}@{socket.gethostname()}:{os.getpid()}"
        self.node = ray_node()

    def info(self) -> WorkerFigures:
        """Who this worker is and how its session runs; answering it means it is ready."""
        return WorkerFigures(worker=self.identity, pool=self.pool.name,
                             provider=self.loaded.active, fallback=self.loaded.fallback,
                             session=self.tuning, memory_mb=memory_limit_mb(), **self.node)

    def process(self, shard_data: dict[str, Any], attempt: int) -> ShardResult:
        """Read, score and commit one shard; the shard's marker on storage (this attempt's,
        or another attempt's that committed it first)."""
        self._exit_if_broken()
        shard = Shard.from_dict(shard_data)
        try:
            return self._process(shard, attempt)
        except ShardError as exc:
            exc.shard_id = shard.id  # the runner reports the shard; the error names it too
            raise

    def _process(self, shard: Shard, attempt: int) -> ShardResult:
        if shard.error:
            raise ShardError(f"{shard.uri}: {shard.error}")
        maybe_inject("worker.start", shard.id, attempt)
        stats = ShardStats()
        task = self.task.with_max_rows(shard.batch_rows) if shard.batch_rows else self.task
        metadata = part_metadata(self.fingerprint, self.bundle.sha256, self.bundle.identity,
                                 shard.id)
        try:
            # Window by window: memory depends on batching.window_rows, not on the shard.
            parts = self.sink.part_files(self.layout, shard.id)
            with ShardWriter(self.layout, shard.id, self.spec.output.compression, metadata,
                             parts) as out:
                # Windows span pieces: a shard of many tiny files still infers full batches.
                window_rows = task.batching.window_rows
                stream = windows(shard_tables(shard, self.read_columns,
                                              self.spec.input.storage_options, window_rows,
                                              self.spec.input.filter),
                                 window_rows)
                for window in stats.timed_iter("read_s", stream):
                    if shard.dead_letter:  # rows that kill workers: kept, never scored
                        self._dead_letter_window(shard, window, out, stats)
                    else:
                        self._score_window(shard, attempt, task, window, out, stats)
                marker = self._marker(shard, attempt, out, stats)
                # The part file is in place, the marker not yet: where a crash is injected.
                committed, ours = out.commit(
                    marker, before_marker=lambda: maybe_inject("worker.after_part", shard.id,
                                                               attempt))
        except ShardError:
            raise
        except MemoryError as exc:  # the runner retries it in smaller pieces
            raise OutOfMemory(f"out of memory: {one_line(exc) or 'MemoryError'}") from exc
        except Exception as exc:
            raise classify_io_error(exc, f"writing output of shard {shard.id}") from exc
        if ours:
            return ShardResult(marker=committed)
        # Another attempt committed the shard first (this one was slow, or its worker was given
        # up on): its files stand, this attempt's were discarded. The runner counts the shard
        # once, from the marker on storage.
        return ShardResult(marker=committed, superseded=Superseded(
            attempt=attempt, worker=self.identity, published=out.published))

    def _score_window(self, shard: Shard, attempt: int, task: Task, tagged: pa.Table,
                      out: ShardWriter, stats: ShardStats) -> None:
        pieces = tagged[PIECE_COLUMN].to_numpy()
        window = tagged.drop_columns([PIECE_COLUMN])
        shard_id = shard.id
        maybe_inject_rows(window, shard_id)  # faults that kill the process on given rows
        # Tokenizing (thread-safe) happens outside the lock, overlapping another shard's inference.
        with stats.timed("prepare_s"):
            prepared = task.prepare(window)
        waiting = time.perf_counter()
        with self.infer_lock:  # time spent waiting here is neither reading nor inferring
            stats.add("wait_s", time.perf_counter() - waiting)
            self._exit_if_broken()  # a call that waited behind the one that broke the session
            maybe_inject("worker.infer", shard_id, attempt)
            with stats.timed("infer_s"):
                scored = score_table(task, self.loaded, window, prepared)
        with stats.timed("write_s"):
            out.write(self._output_table(window, scored))
            out.write_dead(self._dead_letter_table(window, scored.bad, shard, stats.rows_in,
                                                   pieces))
        stats.count(window.num_rows, scored)

    def _dead_letter_window(self, shard: Shard, tagged: pa.Table, out: ShardWriter,
                            stats: ShardStats) -> None:
        """Every row of the window to the dead letters with the shard's reason, unscored."""
        pieces = tagged[PIECE_COLUMN].to_numpy()
        window = tagged.drop_columns([PIECE_COLUMN])
        reason = str(shard.dead_letter)
        bad = dict.fromkeys(range(window.num_rows), reason)
        empty = pa.table({**{name: window[name].slice(0, 0) for name in self.spec.passthrough},
                          **dict(zip(self.task.output_schema.names,
                                     self.task.output_schema.empty_table().columns,
                                     strict=True))})
        with stats.timed("write_s"):
            out.write(empty)  # the part file has the output's columns, and no row
            out.write_dead(self._dead_letter_table(window, bad, shard, stats.rows_in, pieces))
        stats.rows_in += window.num_rows
        stats.reasons[reason] = stats.reasons.get(reason, 0) + window.num_rows

    def _marker(self, shard: Shard, attempt: int, out: ShardWriter,
                stats: ShardStats) -> ShardMarker:
        return ShardMarker(
            shard_id=shard.id, input=redact_uri(shard.uri),
            files=len({p.uri for p in shard.pieces}),
            pieces=[(redact_uri(p.uri), *p.key()[1:]) for p in shard.pieces[:MARKER_PIECES]],
            rows_in=stats.rows_in, rows_out=out.rows_out, rows_bad=out.rows_bad,
            bad_reasons=stats.reasons, row_notes=stats.notes, attempt=attempt, worker=self.identity,
            pool=self.pool.name, **self.node, provider=self.loaded.active,
            fallback=self.loaded.fallback, provider_after=stats.provider_after,
            probes=stats.probes, batches=stats.batches, session=self.tuning,
            oom_splits=stats.oom_splits, fingerprint=self.fingerprint,
            timings=Timings(**{k: round(v, 4) for k, v in stats.timings.items()}),
            peak_rss_mb=peak_rss_mb(),
            part=self.layout.part_path(shard.id).rsplit("/", 1)[-1],
            attempt_token=uuid.uuid4().hex,  # tells this attempt's marker from another's
            committed_at=time.time(), rows_range=shard.rows_range,
            batch_rows=shard.batch_rows, dead_letter=shard.dead_letter)

    def _exit_if_broken(self) -> None:
        """After a DeviceError this process's session, and often its CUDA context, is unusable:
        the actor exits so that the runner requeues its shards and starts a fresh process."""
        if self.loaded.broken is None:
            return
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            print(f"worker {self.identity} exits, its session is broken: {self.loaded.broken}",
                  file=sys.stderr, flush=True)
            ray.actor.exit_actor()
        # Outside an actor score_table raises DeviceError for a broken session.

    def _output_table(self, table: pa.Table, scored) -> pa.Table:
        take = pa.array(scored.rows, pa.int64())
        columns = {name: table[name].take(take) for name in self.spec.passthrough}
        for name in scored.columns.column_names:
            columns[name] = scored.columns[name]
        if not columns:
            return pa.table({})
        if self.task.explodes:  # a row per chunk, the input row's passthrough on each
            return explode(pa.table(columns), self.task.explodes)
        return pa.table(columns)

    def _dead_letter_table(self, table: pa.Table, bad: dict[int, str], shard: Shard,
                           offset: int, pieces: np.ndarray) -> pa.Table | None:
        """Bad rows with their identifying columns and where they came from."""
        where = {  # which input file each row came from, and the shard
            "_shard_id": lambda rows: pa.array([shard.id] * len(rows), pa.string()),
            "_input": lambda rows: pa.array([redact_uri(shard.pieces[pieces[r]].uri)
                                             for r in rows], pa.string()),
        }
        # The row's position in its root shard: a sub-shard's rows start at its range.
        offset += shard.rows_range[0] if shard.rows_range else 0
        row = {"_row": lambda rows: pa.array([offset + r for r in rows], pa.int64())}
        return dead_letter_table(table, bad, [*self.spec.passthrough, *self.task.input_columns],
                                 before_reason=row, after_reason=where)


MARKER_PIECES = 32  # a packed shard of many small files names the first ones only


def memory_limit_mb() -> float | None:
    """The memory this process may use: its cgroup's limit where one is set, else the
    machine's (Linux); Ray's memory monitor kills workers as the node nears it."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            limits.append(int(value))
    try:
        with open("/proc/meminfo") as fh:
            total = next(line for line in fh if line.startswith("MemTotal:"))
        limits.append(int(total.split()[1]) * 1024)
    except (OSError, StopIteration, ValueError):
        pass
    return round(min(limits) / 2**20, 1) if limits else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class ShardStats:
    """Counts and timings of one shard, summed over its windows."""

    def __init__(self) -> None:
        self.rows_in = 0
        self.batches = 0
        self.oom_splits = 0
        self.probes = 0
        self.provider_after: str | None = None
        self.reasons: dict[str, int] = {}
        self.notes: dict[str, int] = {}
        self.timings = dict.fromkeys(("read_s", "prepare_s", "wait_s", "infer_s", "write_s"), 0.0)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] += seconds

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def timed_iter(self, name: str, items: Iterator[pa.Table]) -> Iterator[pa.Table]:
        iterator = iter(items)
        while True:
            with self.timed(name):
                item = next(iterator, None)
            if item is None:
                return
            yield item

    def count(self, rows: int, scored: Any) -> None:
        self.rows_in += rows
        self.batches += scored.batches
        self.oom_splits += scored.oom_splits
        self.probes += scored.probes
        self.provider_after = scored.provider_after
        for reason in scored.bad.values():
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        for note, rows in scored.notes.items():
            self.notes[note] = self.notes.get(note, 0) + rows

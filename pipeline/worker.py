"""The worker: a Ray actor that reads a shard, runs the task, writes the part file and marker.

Sessions and tasks are attributes of the worker, created inside its process (never pickled).
Up to ``max_in_flight`` calls run in threads at once: one thread infers (a lock keeps the
session to one caller, whose intra-op threads use the actor's CPUs) while others read the
next shard or write the previous one, so I/O overlaps with inference.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.commit import META_FINGERPRINT, META_MODEL, META_SHARD, OutputLayout
from pipeline.errors import ShardError, classify_io_error
from pipeline.faults import maybe_inject
from pipeline.formats import read_table
from pipeline.inference import score_table
from pipeline.models.bundle import fetch_bundle
from pipeline.models.shipping import ShippedBundle, install_bundle
from pipeline.plan import Shard
from pipeline.sessions import SessionCache, SessionSettings
from pipeline.spec import JobSpec
from pipeline.tasks import build_task


@dataclass(frozen=True)
class PoolSettings:
    name: str  # "cpu" or "gpu"
    providers: tuple[str, ...]
    threads: int


def session_settings(spec: JobSpec, pool: PoolSettings) -> SessionSettings:
    options = tuple((p, tuple(sorted(spec.providers.options.get(p, {}).items())))
                    for p in pool.providers)
    return SessionSettings(providers=pool.providers, provider_options=options,
                           intra_op_threads=pool.threads)


def ray_node() -> dict[str, str | None]:
    """The Ray node this process runs on (None outside Ray), for markers and the report."""
    import ray

    if not ray.is_initialized():
        return {"node_id": None, "node_ip": None}
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address()}


class ShardWorker:
    def __init__(self, spec: JobSpec, fingerprint: str, read_columns: list[str],
                 pool: PoolSettings, shipped_bundle: ShippedBundle | None = None) -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.read_columns = read_columns
        self.pool = pool
        self.layout = OutputLayout(spec.output.uri, spec.output.storage_options)
        # A bundle only the driver can read arrives through the object store.
        self.bundle = install_bundle(shipped_bundle) if shipped_bundle else \
            fetch_bundle(spec.model.uri, spec.model.storage_options, spec.model.sha256)
        self.sessions = SessionCache()
        self.loaded = self.sessions.get(str(self.bundle.model_path), self.bundle.sha256,
                                        session_settings(spec, pool))
        types = {i.name: i.type for i in self.loaded.session.get_inputs()}
        self.task = build_task(self.bundle, spec.task, spec.batching, types)
        self.infer_lock = threading.Lock()
        self.identity = f"{pool.name}@{socket.gethostname()}:{os.getpid()}"
        self.node = ray_node()

    def info(self) -> dict[str, Any]:
        return {"worker": self.identity, "pool": self.pool.name, "provider": self.loaded.active,
                "fallback": self.loaded.fallback, **self.node}

    def process(self, shard_data: dict[str, Any], attempt: int) -> dict[str, Any]:
        shard = Shard.from_dict(shard_data)
        if shard.error:
            raise ShardError(f"{shard.uri}: {shard.error}")
        maybe_inject("worker.start", shard.id, attempt)
        t0 = time.perf_counter()
        table = self._read(shard)
        # Tokenizing (thread-safe) happens outside the lock, overlapping another shard's inference.
        t_read = time.perf_counter()
        prepared = self.task.prepare(table)
        t1 = time.perf_counter()
        with self.infer_lock:  # time spent waiting here is neither reading nor inferring
            waited = time.perf_counter() - t1
            maybe_inject("worker.infer", shard.id, attempt)
            scored = score_table(self.task, self.loaded, table, prepared)
        t2 = time.perf_counter()
        out = self._output_table(table, scored)
        dead = self._dead_letter_table(table, scored.bad, shard.id)
        try:
            self.layout.write_part(shard.id, out, self.spec.output.compression, {
                META_FINGERPRINT: self.fingerprint.encode(),
                META_MODEL: self.bundle.sha256.encode(),
                META_SHARD: shard.id.encode(),
            })
            maybe_inject("worker.after_part", shard.id, attempt)
            self.layout.write_dead_letter(shard.id, dead)
            reasons: dict[str, int] = {}
            for reason in scored.bad.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            marker = {
                "shard_id": shard.id, "input": shard.uri, "row_groups": shard.row_groups,
                "rows_in": table.num_rows, "rows_out": out.num_rows, "rows_bad": len(scored.bad),
                "bad_reasons": reasons, "attempt": attempt, "worker": self.identity,
                "pool": self.pool.name, **self.node, "provider": self.loaded.active,
                "fallback": self.loaded.fallback, "batches": scored.batches,
                "oom_splits": scored.oom_splits, "fingerprint": self.fingerprint,
                "timings": {"read_s": round(t_read - t0, 4),
                            "prepare_s": round(t1 - t_read, 4), "wait_s": round(waited, 4),
                            "infer_s": round(t2 - t1 - waited, 4),
                            "write_s": round(time.perf_counter() - t2, 4)},
                "part": self.layout.part_path(shard.id).rsplit("/", 1)[-1],
                "committed_at": time.time(),
            }
            self.layout.write_marker(shard.id, marker)
        except ShardError:
            raise
        except Exception as exc:
            raise classify_io_error(exc, f"writing output of shard {shard.id}") from None
        return marker

    def _read(self, shard: Shard) -> pa.Table:
        fs, path = storage.filesystem(shard.uri, self.spec.input.storage_options)
        try:
            return read_table(fs, path, shard.format, self.read_columns, shard.row_groups)
        except Exception as exc:
            raise classify_io_error(exc, f"reading {shard.uri}") from None

    def _output_table(self, table: pa.Table, scored) -> pa.Table:
        take = pa.array(scored.rows, pa.int64())
        columns = {name: table[name].take(take) for name in self.spec.passthrough}
        for name in scored.columns.column_names:
            columns[name] = scored.columns[name]
        if not columns:
            return pa.table({})
        return pa.table(columns)

    def _dead_letter_table(self, table: pa.Table, bad: dict[int, str], shard_id: str):
        if not bad:
            return None
        rows = sorted(bad)
        take = pa.array(rows, pa.int64())
        names = list(dict.fromkeys([*self.spec.passthrough, *self.task.input_columns]))
        columns = {n: table[n].take(take) for n in names if n in table.column_names}
        columns["_row"] = pa.array(rows, pa.int64())
        columns["_reason"] = pa.array([bad[r] for r in rows], pa.string())
        columns["_shard_id"] = pa.array([shard_id] * len(rows), pa.string())
        return pa.table(columns)

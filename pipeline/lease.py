"""One driver per output: a lease on ``_pipeline/lease.json``, renewed by a heartbeat.

A run takes the lease before it writes anything, and gives it back when it ends. The file
names the holder (host, pid, job, Ray job id, start) and when it last renewed. Every change
to it is conditional, so two drivers never both believe they hold it:

- S3: created with ``If-None-Match: *``; renewed, taken over and removed with ``If-Match``
  on the ETag the writer read (AWS, MinIO and moto honour both).
- Local and shared filesystems: created exclusively (a hard link), then changed in place
  under ``flock`` on the file itself, after checking that the locked file is still the one
  at the path (NFS v4 and Lustre honour the lock; a mount without locks does not).
- Other fsspec stores: created with fsspec's ``mode="create"``, then read, compared and
  rewritten, which another writer can interleave with.

A second driver is refused (exit 2) in one line naming the holder, or waits (``--wait``).
A lease whose holder stopped renewing for ``output.lease_timeout_s`` (its own, recorded in
the file) is taken over, and so at once is one whose holder was a process on this very
machine that no longer runs (same boot and pid namespace, and no process with its pid and start
time). Renewal compares the holder's clock (``renewed_at``) with the reader's:
hosts' clocks must agree to well within the timeout, as NTP keeps them.

A holder learns that it lost the lease (taken over, or not renewed for the timeout because
storage failed) on its next heartbeat; the job then stops dispatching and commits nothing
more: no run manifest, no table commit, no ``_SUCCESS``, no report.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.errors import OutputError, PipelineError, cause_text
from pipeline.layout import OutputLayout
from pipeline.lease_stores import LeaseStore, store_for
from pipeline.state import LeaseRecord

log = logging.getLogger(__name__)
RENEWALS_PER_TIMEOUT = 4  # a heartbeat every timeout / 4: three may fail before it expires


class LeaseLost(PipelineError):
    """This driver no longer holds the output: it stops and commits nothing more."""

    exit_code = 1


# ----------------------------------------------------------------------------- the lease


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell a live holder
    from a new process that reuses its pid; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return float(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_space() -> str | None:
    """This boot of this machine and this pid namespace: two processes that share it see the
    same pids (containers on one host share a boot, not a pid namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def holder_gone(record: LeaseRecord, space: str | None) -> bool:
    """The holder was a process that this one could see, and it no longer runs."""
    if space is None or record.process_space != space or record.pid_started is None:
        return False
    return process_started(record.pid) != record.pid_started


class OutputLease:
    """The lease of one output for one run: ``acquire``, ``start_heartbeat``, ``lost`` and
    ``check`` while it runs, ``release`` at its end."""

    def __init__(self, layout: OutputLayout, job: str, timeout_s: float,
                 clock: Callable[[], float] = time.time, store: LeaseStore | None = None) -> None:
        self.layout = layout
        self.store = store or store_for(layout)
        self.clock = clock
        self.timeout_s = timeout_s
        now = clock()
        self.space = process_space()
        self.record = LeaseRecord(token=uuid.uuid4().hex, host=socket.gethostname(),
                                  pid=os.getpid(), pid_started=process_started(os.getpid()),
                                  process_space=self.space, job=job, started_at=now,
                                  renewed_at=now, timeout_s=timeout_s)
        self._lost: str | None = None
        self._last_renewal = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.contended = False  # another driver held it while this one asked for it

    # ---------------------------------------------------------------- taking it

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                poll_s: float | None = None) -> None:
        """Hold the lease, or raise OutputError naming the holder (``wait``: wait for it)."""
        poll = poll_s or max(0.2, min(5.0, self.timeout_s / RENEWALS_PER_TIMEOUT))
        told = False
        while True:
            current = self._read()
            if current is None:
                if self._create():
                    return
                continue  # another driver created it first: read it
            holder, version = current
            self.contended = True
            now = self.clock()
            if holder is None or self._expired(holder, now) or \
                    holder_gone(holder, self.space):
                if self._take_over(holder, version, now):
                    return
                continue
            if not wait:
                raise OutputError(
                    f"output.uri: {self.layout.uri} is held by another driver: "
                    f"{holder.describe(now)}; rerun with --wait to wait for it (a holder that "
                    f"stops renewing is taken over after {holder.timeout_s:g} s)")
            if on_wait and not told:
                on_wait(f"waiting for the lease of {self.layout.uri}, held by "
                        f"{holder.describe(now)}")
                told = True
            time.sleep(poll)

    def _expired(self, holder: LeaseRecord, now: float) -> bool:
        return now - holder.renewed_at > holder.timeout_s

    def _create(self) -> bool:
        return self.store.create(self.record.model_dump_json().encode())

    def _take_over(self, holder: LeaseRecord | None, version: Any, now: float) -> bool:
        what = holder.describe(now) if holder else "an unreadable lease file"
        self.record = self.record.model_copy(update={"took_over": what, "renewed_at": now})
        if not self.store.replace(self.record.model_dump_json().encode(), version):
            return False
        log.warning("took over the lease of %s from %s", self.layout.uri, what)
        return True

    def _read(self) -> tuple[LeaseRecord | None, Any] | None:
        raw = self.store.read()
        if raw is None:
            return None
        data, version = raw
        try:
            return LeaseRecord.model_validate_json(data), version
        except ValueError:  # a torn write on a store without atomic writes: take it over
            return None, version

    # ---------------------------------------------------------------- holding it

    def note_ray_job(self, ray_job_id: str | None) -> None:
        if ray_job_id:
            with self._lock:
                self.record = self.record.model_copy(update={"ray_job_id": ray_job_id})
            self.renew()

    def start_heartbeat(self) -> None:
        interval = self.timeout_s / RENEWALS_PER_TIMEOUT
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                         name="lease-heartbeat")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval) and self._lost is None:
            self.renew()

    def renew(self) -> None:
        """Write a new ``renewed_at`` if the lease is still ours; else note it is lost."""
        with self._lock:
            if self._lost:
                return
            now = self.clock()
            try:
                current = self._read()
                if current is None or current[0] is None or \
                        current[0].token != self.record.token:
                    who = current[0].describe(now) if current and current[0] else "nobody"
                    self._lose(f"the lease of {self.layout.uri} was taken over (it is held by "
                               f"{who})")
                    return
                record = self.record.model_copy(update={"renewed_at": now})
                data = record.model_dump_json().encode()
                if self.store.replace(data, current[1]):
                    self.record, self._last_renewal = record, now
                    return
            except Exception as exc:  # storage trouble: retried on the next beat
                log.warning("lease of %s not renewed: %s", self.layout.uri, cause_text(exc))
            if now - self._last_renewal > self.timeout_s:
                self._lose(f"the lease of {self.layout.uri} could not be renewed for "
                           f"{now - self._last_renewal:.0f} s (output.lease_timeout_s="
                           f"{self.timeout_s:g}); another driver may hold it now")

    def _lose(self, why: str) -> None:
        self._lost = why
        log.error("%s: this driver stops and commits nothing more", why)

    def lost(self) -> str | None:
        """Why this driver no longer holds the output, or None while it does."""
        return self._lost

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours (read from storage, not assumed)."""
        self.renew()
        if self._lost:
            raise LeaseLost(f"{self._lost}; this driver stopped without committing the run")

    # ---------------------------------------------------------------- giving it back

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._lost:
                return
            try:
                current = self._read()
                if current is not None and current[0] is not None and \
                        current[0].token == self.record.token:
                    self.store.delete(current[1])
            except Exception as exc:  # it expires by itself
                log.warning("lease of %s not released: %s", self.layout.uri, cause_text(exc))

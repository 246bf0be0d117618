"""Fault injection points for the reliability suite; inert unless PIPELINE_FAULTS is set.

PIPELINE_FAULTS is a JSON list of {"point": ..., "action": "kill"|"raise"|"transient"|"sleep"|
"device"|"barrier", "shard": optional id prefix, "attempt": optional attempt number, "once_file":
optional path}. A rule with ``once_file`` fires only if that file can be created (once across
processes).

``"action": "barrier"`` (with ``"dir"``, ``"parties"`` and ``"timeout_s"``) holds the shard
until ``parties`` distinct processes have reached the barrier (each leaves a file named by its
pid in ``dir``, on a filesystem they share), or until the timeout: multi-node tests use it to
make every worker take shards, however long the last one takes to start.

``"point": "worker.rows"`` fires on the rows themselves: ``"column"`` (default ``id``) and
``"values"`` name them, and when a window holding one reaches the model the worker process
dies (``"action": "abort"``: ``os.abort()``, SIGABRT; ``"segv"``: SIGSEGV) or allocates far
past its memory (``"oom"``: a real ``MemoryError``), as a poison row does in native code.

``"action": "device"`` (at "worker.infer", which runs just before the shard's inference, in the
same thread) breaks the session for that one shard: every run of its batches raises a CUDA-like
error (``"message"`` overrides it), as a sticky device error would, so the shard goes through
the real error classification in pipeline.inference instead of an exception raised here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from pipeline.errors import ShardError, TransientError

DEVICE_FAULT = "CUDA failure 700: an illegal memory access was encountered"
_armed = threading.local()  # the device fault waiting for this thread's next score_table()


def _rules() -> list[dict]:
    raw = os.environ.get("PIPELINE_FAULTS")
    return json.loads(raw) if raw else []


def maybe_inject(point: str, shard_id: str, attempt: int) -> None:
    for rule in _rules():
        if rule.get("point") != point:
            continue
        if rule.get("shard") and not shard_id.startswith(rule["shard"]):
            continue
        if rule.get("attempt") is not None and rule["attempt"] != attempt:
            continue
        once = rule.get("once_file")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
        action = rule.get("action", "raise")
        if action == "sleep":  # slows shards down so other faults land mid-job
            time.sleep(float(rule.get("seconds", 0.1)))
            continue
        if action == "barrier":
            _wait_at_barrier(rule)
            continue
        if action == "device":
            _armed.message = str(rule.get("message", DEVICE_FAULT))
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "transient":
            raise TransientError(f"injected transient fault at {point} for shard {shard_id}")
        raise ShardError(f"injected fault at {point} for shard {shard_id}")


def maybe_inject_rows(window: Any, shard_id: str) -> None:
    """Faults on given rows of ``window`` (a pyarrow Table about to be scored)."""
    for rule in _rules():
        if rule.get("point") != "worker.rows":
            continue
        column = rule.get("column", "id")
        if column not in window.column_names:
            continue
        hit = set(rule.get("values", [])) & set(window[column].to_pylist())
        if not hit:
            continue
        action = rule.get("action", "abort")
        print(f"injected {action} on rows {sorted(hit)} of shard {shard_id}", flush=True)
        if action == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "oom":
            import numpy as np

            np.empty(1 << 50, dtype=np.uint8)  # 1 PiB: the allocator refuses, MemoryError
        os.abort()


def _wait_at_barrier(rule: dict[str, Any]) -> None:
    folder = rule["dir"]
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(os.getpid())), "a").close()
    deadline = time.monotonic() + float(rule.get("timeout_s", 120))
    while len(os.listdir(folder)) < int(rule.get("parties", 2)) and time.monotonic() < deadline:
        time.sleep(0.05)


def take_session_fault() -> str | None:
    """The device fault armed for this thread's next shard, if any (cleared once taken)."""
    message = getattr(_armed, "message", None)
    _armed.message = None
    return message


class FailingSession:
    """An InferenceSession whose every run fails as onnxruntime reports a kernel's CUDA error;
    everything else (get_providers, get_inputs, ...) is the real session's."""

    def __init__(self, session: Any, message: str = DEVICE_FAULT) -> None:
        self.session = session
        self.message = message
        self.runs = 0

    def run(self, output_names, feeds, run_options=None):
        self.runs += 1
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while "
                           f"running Gemm node. Name:'injected' Status Message: {self.message}")

    def __getattr__(self, name: str) -> Any:
        if name == "session":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.session, name)

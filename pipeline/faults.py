"""Fault injection points for the reliability suite; inert unless PIPELINE_FAULTS is set.

PIPELINE_FAULTS is a JSON list of {"point": ..., "action": "kill"|"raise"|"transient"|"sleep",
"shard": optional id prefix, "attempt": optional attempt number, "once_file": optional path}.
A rule with ``once_file`` fires only if that file can be created (once across processes).
"""

from __future__ import annotations

import json
import os
import signal
import time

from pipeline.errors import ShardError, TransientError


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
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "transient":
            raise TransientError(f"injected transient fault at {point} for shard {shard_id}")
        raise ShardError(f"injected fault at {point} for shard {shard_id}")

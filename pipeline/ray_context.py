"""What a process can learn about the Ray worker it runs in, without importing Ray.

``OnnxPredictor`` runs inside Ray Data actors, ``Scorer`` in any process: both ask here
whether they run in a Ray worker (relative paths are refused there) and how many CPUs Ray
gave it. Ray is only asked if something else already loaded it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.errors import ConfigError


def ray_worker_context() -> Any:
    """Ray's runtime context when this process is a Ray worker (an actor or task), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        context = ray.get_runtime_context()
        return context if context.worker.mode == ray.WORKER_MODE else None
    except Exception:  # an older or half-started Ray: no context to honour
        return None


def ray_actor_threads() -> int:
    """One intra-op thread per CPU Ray gave this actor, as the job's workers do; 0 (onnxruntime
    picks) outside a Ray worker."""
    context = ray_worker_context()
    try:
        cpus = context.get_assigned_resources().get("CPU") if context else None
    except Exception:  # no resource view (a driver, a local-mode worker): let onnxruntime pick
        cpus = None
    return max(1, int(cpus)) if cpus else 0


def check_not_relative(key: str, uri: str | None) -> None:
    """A Ray worker never resolves a path against its own working directory (not the caller's)."""
    if uri and storage.is_local(uri) and not Path(uri.removeprefix("file://")).is_absolute() \
            and ray_worker_context() is not None:
        raise ConfigError(f"{key}: {uri!r} is a relative path, and this runs in a Ray worker whose "
                          "working directory is not yours; pass an absolute path or a URL")

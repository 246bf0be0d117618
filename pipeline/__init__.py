"""Distributed, exactly-once batch inference for ONNX models on Ray.

    pipeline.run_job("jobs/embed.yaml", overrides={"workers.cpu.replicas": 4})
    pipeline.score(table, model="models/minilm", task="embed")
    ds.map_batches(pipeline.OnnxPredictor, fn_constructor_kwargs={"model": "/abs/models/minilm"},
                   compute=ray.data.ActorPoolStrategy(size=2), batch_format="pyarrow")
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> module that defines it.
_EXPORTS = {
    "JobResult": "pipeline.job",
    "OnnxPredictor": "pipeline.predictor",
    "Scorer": "pipeline.api",
    "run_job": "pipeline.api",
    "score": "pipeline.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `python -m pipeline.models` should not pay for importing Ray.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

"""Distributed, exactly-once batch inference for ONNX models on Ray.

    pipeline.run_job("jobs/embed.yaml", overrides={"workers.cpu.replicas": 4})
    pipeline.score(table, model="models/minilm", task="embed")
"""

from __future__ import annotations

from typing import Any

__all__ = ["JobResult", "Scorer", "run_job", "score"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m pipeline.models` should not pay for importing Ray.
    if name in __all__:
        from pipeline import api, job

        return getattr(api, name, None) or getattr(job, name)
    raise AttributeError(name)

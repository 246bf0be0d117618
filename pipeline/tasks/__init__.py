"""Tasks turn Arrow rows into model inputs (prepare) and model outputs into columns (finish)."""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.models.bundle import LocalBundle
from pipeline.spec import BatchingSpec, ClassifyTaskSpec, EmbedTaskSpec, TensorTaskSpec
from pipeline.tasks.base import Batch, Prepared, Task
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.embed import EmbedTask
from pipeline.tasks.tensor import TensorTask

TASKS: dict[str, type[Task]] = {"embed": EmbedTask, "classify": ClassifyTask, "tensor": TensorTask}


def build_task(
    bundle: LocalBundle,
    spec: EmbedTaskSpec | ClassifyTaskSpec | TensorTaskSpec,
    batching: BatchingSpec,
    input_types: dict[str, str],
    device: str = "cpu",
) -> Task:
    """The task for a job; ``input_types`` are the graph's input types by name. ``device`` is
    the provider that runs the session ("cpu", "cuda", ...): it picks the batch sizes the job
    left out."""
    if bundle.spec.task != spec.kind:
        raise ConfigError(
            f"task.kind: {spec.kind!r} but the bundle {bundle.uri} is a {bundle.spec.task!r} model"
        )
    batching = batching.for_device(device, text=bundle.spec.text is not None)
    return TASKS[spec.kind](bundle, spec, batching, input_types)


__all__ = ["Batch", "Prepared", "Task", "build_task"]

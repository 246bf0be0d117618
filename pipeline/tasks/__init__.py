"""Tasks turn Arrow rows into model inputs (prepare) and model outputs into columns (finish)."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.models.bundle import LocalBundle
from pipeline.spec import (
    BatchingSpec,
    ClassifyTaskSpec,
    DetectTaskSpec,
    EmbedTaskSpec,
    GenerateTaskSpec,
    RerankTaskSpec,
    SparseEmbedTaskSpec,
    TensorTaskSpec,
    TokenClassifyTaskSpec,
    ZeroShotTaskSpec,
)
from pipeline.tasks.base import Batch, Prepared, Task
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.detect import DetectTask
from pipeline.tasks.embed import EmbedTask
from pipeline.tasks.generate import GenerateTask
from pipeline.tasks.rerank import RerankTask
from pipeline.tasks.sparse_embed import SparseEmbedTask
from pipeline.tasks.tensor import TensorTask
from pipeline.tasks.token_classify import TokenClassifyTask
from pipeline.tasks.zero_shot import NLI_TEMPLATE, ZeroShotTask
from pipeline.tasks.zero_shot_image import CLIP_TEMPLATE, ImageZeroShotTask

TASKS: dict[str, type[Task]] = {"embed": EmbedTask, "classify": ClassifyTask,
                                "rerank": RerankTask, "token-classify": TokenClassifyTask,
                                "zero-shot": ZeroShotTask, "sparse-embed": SparseEmbedTask,
                                "detect": DetectTask, "generate": GenerateTask,
                                "tensor": TensorTask}


AnyTaskSpec = EmbedTaskSpec | ClassifyTaskSpec | RerankTaskSpec | TokenClassifyTaskSpec | \
    ZeroShotTaskSpec | SparseEmbedTaskSpec | DetectTaskSpec | GenerateTaskSpec | TensorTaskSpec
SPECS: dict[str, type[AnyTaskSpec]] = {"embed": EmbedTaskSpec, "classify": ClassifyTaskSpec,
                                       "rerank": RerankTaskSpec,
                                       "token-classify": TokenClassifyTaskSpec,
                                       "zero-shot": ZeroShotTaskSpec,
                                       "sparse-embed": SparseEmbedTaskSpec,
                                       "detect": DetectTaskSpec,
                                       "generate": GenerateTaskSpec,
                                       "tensor": TensorTaskSpec}


def resolve_task(spec: AnyTaskSpec | None, bundle: LocalBundle) -> AnyTaskSpec:
    """The job's task with what it leaves out taken from the bundle: the bundle's own task,
    and the conventional ``text`` column for a text classifier."""
    if spec is None and bundle.spec.task == "zero-shot":
        raise ConfigError(f"task.labels: {bundle.uri} is a zero-shot image classifier (CLIP); "
                          "a job names its classes: task: {labels: [...]}")
    if spec is None:
        spec = SPECS[bundle.spec.task](kind=bundle.spec.task)
    if isinstance(spec, ClassifyTaskSpec) and spec.text_column is None and \
            (bundle.spec.needs_tokenizer() or bundle.spec.takes_raw_text()):
        spec = spec.model_copy(update={"text_column": "text"})
    # Defaults that depend on the model, made concrete: the job's fingerprint holds the value
    # that runs (and the one jobs written before these defaults moved recorded).
    if isinstance(spec, ZeroShotTaskSpec) and spec.template is None:
        template = CLIP_TEMPLATE if bundle.spec.task == "zero-shot" else NLI_TEMPLATE
        spec = spec.model_copy(update={"template": template})
    if isinstance(spec, DetectTaskSpec) and spec.score_threshold is None:
        detr = bundle.spec.detection is not None and bundle.spec.detection.layout == "detr"
        spec = spec.model_copy(update={"score_threshold": 0.5 if detr else 0.25})
    return spec


def build_task(
    bundle: LocalBundle,
    spec: AnyTaskSpec | None,
    batching: BatchingSpec,
    input_types: dict[str, str],
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> Task:
    """The task for a job; ``input_types`` are the graph's input types by name. ``device`` is
    the provider that runs the session ("cpu", "cuda", ...): it picks the batch sizes the job
    left out. ``storage_options`` open image files a path column names (the input's)."""
    spec = resolve_task(spec, bundle)
    # Zero-shot runs an NLI classifier (a classify bundle with labels the task reads) or a
    # CLIP model (a zero-shot bundle).
    runs_on = ("classify", "zero-shot") if spec.kind == "zero-shot" else (spec.kind,)
    if bundle.spec.task not in runs_on:
        raise ConfigError(
            f"task.kind: {spec.kind!r} but the bundle {bundle.uri} is a {bundle.spec.task!r} model"
        )
    batching = batching.for_device(device, bundle.spec.modality)
    if bundle.spec.max_batch is not None and batching.max_rows > bundle.spec.max_batch:
        batching = batching.model_copy(update={"max_rows": bundle.spec.max_batch})
    kind = ImageZeroShotTask if bundle.spec.task == "zero-shot" else TASKS[spec.kind]
    return kind(bundle, spec, batching, input_types, storage_options)


__all__ = ["Batch", "Prepared", "Task", "build_task", "resolve_task"]

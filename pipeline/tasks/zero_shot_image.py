"""Zero-shot image classification: a CLIP model with both towers labels each image with
classes chosen by the job.

As ``transformers.pipeline("zero-shot-image-classification")`` computes it for CLIP: each
label becomes a caption (``template.format(label)``, by default "This is a photo of {}."),
the captions are tokenized together and padded to the longest, and each image's
``logits_per_image`` over them go through a softmax. The captions are encoded once and fed
beside every batch of images; the image tower's pixels are the bundle's image section's.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError, ModelError
from pipeline.tasks.base import Batch, Prepared, Task, fixed_size_list, softmax
from pipeline.tasks.images import image_encoder
from pipeline.tasks.text import TextEncoder, task_tokenizer

CLIP_TEMPLATE = "This is a photo of {}."  # the pipeline's hypothesis_template


def zero_shot_schema(spec) -> pa.Schema:
    """label, score and (unless turned off) probabilities in the order of task.labels."""
    fields = [(spec.label_column, pa.string()), (spec.score_column, pa.float32())]
    if spec.probabilities_column:
        fields.append((spec.probabilities_column, pa.list_(pa.float32(), len(spec.labels))))
    return pa.schema(fields)


def zero_shot_columns(spec, scores: np.ndarray) -> dict[str, pa.Array]:
    best = scores.argmax(axis=1)
    columns = {spec.label_column: pa.array([spec.labels[i] for i in best], pa.string()),
               spec.score_column: pa.array(scores.max(axis=1), pa.float32())}
    if spec.probabilities_column:
        columns[spec.probabilities_column] = fixed_size_list(scores)
    return columns


class ZeroShotOutputs(Task):
    """What both zero-shot tasks write, from the model's ``logits``."""

    @property
    def output_schema(self) -> pa.Schema:
        return zero_shot_schema(self.spec)

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["logits"]]


class ImageZeroShotTask(ZeroShotOutputs):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        if not (bspec.takes_images() and bspec.needs_tokenizer() and "logits" in bspec.outputs):
            raise ConfigError(f"task.kind: zero-shot over images needs a CLIP bundle (image and "
                              f"token inputs, outputs.logits), {bundle.uri} is not")
        if spec.multi_label:
            raise ConfigError("task.multi_label: CLIP scores an image's labels against each "
                              "other (a softmax over them); there is no per-label probability")
        self.images = image_encoder(bundle, input_types, storage_options, exif=True)
        tokenizer, max_length = task_tokenizer(bundle, spec)
        tokenizer.no_truncation()  # a caption is never cut: a label that does not fit is refused
        captions = [(spec.template or CLIP_TEMPLATE).format(label) for label in spec.labels]
        encoder = TextEncoder(tokenizer, bspec.inputs, keep_empty=True)
        encodings = tokenizer.encode_batch(captions)
        for label, encoding in zip(spec.labels, encodings, strict=True):
            if len(encoding.ids) > max_length:
                raise ConfigError(f"task.labels: the caption for {label!r} is "
                                  f"{len(encoding.ids)} tokens, over the model's max_length "
                                  f"{max_length}")
        self.captions = encoder.feed_batch(np.arange(len(captions)), encodings).feeds

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.image_column]

    def prepare(self, table: pa.Table) -> Prepared:
        column = self.spec.image_column
        return self.images.prepare(table[column], column, self.batching.max_rows)

    def run_model(self, session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The batch's images with every caption: the captions are not batch rows (a split
        batch or the health probe keeps them whole)."""
        return session.run(self.output_names, {**feeds, **self.captions})

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        logits = np.asarray(outputs[0], dtype=np.float32)
        labels = len(self.spec.labels)
        if logits.shape != (len(batch), labels):
            raise ModelError(f"task.kind: zero-shot needs logits_per_image [images, {labels}], "
                             f"the model gives {list(logits.shape)}")
        scores = softmax(logits)
        finite = np.isfinite(scores).all(axis=1)
        bad = {int(r): "model produced non-finite values" for r in batch.rows[~finite]}
        return zero_shot_columns(self.spec, scores[finite]), bad

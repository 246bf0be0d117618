"""Object detection: each image's boxes, labels and scores, as ultralytics' predictor gives
them for a YOLO export (``pipeline.tasks.letterbox`` makes its input,
``pipeline.tasks.detections`` reads its output), or as a DETR's image processor and its
``post_process_object_detection`` give them (pixels as ``pipeline.tasks.images`` makes them,
at each image's own resized size).

Images are decoded in a thread pool (EXIF orientation applied, alpha dropped, as both
frameworks load them), made into model input, and batched by input shape (a dynamic YOLO
export runs each image at its own stride rectangle, a DETR at its own resized size: images of
one shape share a batch, and none is padded by another's). Boxes are x1, y1, x2, y2 in the
original image's pixels, highest score first.

One departure: an end-to-end head keeps its ``max_det`` best boxes with a TopK that fails
when an input has fewer anchors than that (a wide image's small rectangle); ultralytics then
fails the image. Such an image runs at the full square, and the report counts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.errors import ConfigError, ModelError
from pipeline.models.bundle import IMAGE_SOURCE, LETTERBOX_SOURCE, PIL_MAX_PIXELS
from pipeline.tasks.base import Batch, Prepared, Task
from pipeline.tasks.detections import from_chosen, from_detr, from_raw, to_image
from pipeline.tasks.images import BadImage, image_cells, open_image, read_cell, resized, scaled
from pipeline.tasks.letterbox import Letterbox, letterbox_params, letterboxed, rgb_of, to_input

DETECTION_TYPE = pa.struct([("label", pa.string()), ("score", pa.float32()),
                            ("box", pa.list_(pa.float32(), 4))])
HEAD_STRIDES = (8, 16, 32)  # YOLO's detection levels
SQUARED_NOTE = "letterboxed to the full square: the end-to-end head needs more anchors than " \
               "its stride rectangle has"


class DetectTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        if bspec.detection is None or not bspec.labels or \
                not (bspec.takes_letterboxed() or bspec.takes_images()):
            raise ConfigError(f"task.kind: detect needs a detection bundle (a YOLO or DETR "
                              f"export), {bundle.uri} is not")
        self.detection = bspec.detection
        self.detr = bspec.detection.layout == "detr"
        self.labels = list(bspec.labels)
        source = IMAGE_SOURCE if self.detr else LETTERBOX_SOURCE
        self.input_name = next(n for n, s in bspec.inputs.items() if s == source)
        self.dtype = np.float16 if input_types.get(self.input_name) == "tensor(float16)" \
            else np.float32
        # Each framework's own default: ultralytics' conf, transformers' threshold.
        self.score_threshold = spec.score_threshold if spec.score_threshold is not None \
            else 0.5 if self.detr else 0.25
        self.pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="detect-decode")

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.image_column]

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_column, pa.list_(DETECTION_TYPE))])

    @property
    def output_names(self) -> list[str]:
        outputs = self.bundle.spec.outputs
        return [outputs["logits"], outputs["boxes"]] if self.detr else [outputs["detections"]]

    def _letterbox(self, height: int, width: int) -> tuple[Letterbox, bool]:
        d = self.detection
        box = letterbox_params(height, width, d.imgsz, d.stride, d.rect)
        if d.rect and d.layout == "yolo-end2end":
            anchors = sum((box.input_height // s) * (box.input_width // s) for s in HEAD_STRIDES)
            if anchors < self.spec.max_detections:
                return letterbox_params(height, width, d.imgsz, d.stride, False), True
        return box, False

    def one(self, cell: Any) -> tuple[np.ndarray, Letterbox | tuple[int, int], bool] | str:
        """One image as 8-bit model input (letterboxed ``[3, H, W]``, or for DETR resized
        ``[H, W, 3]``), where it went (its letterbox, or its height and width), whether it
        was squared; or why there is none. Float pixels are made batch by batch."""
        try:
            rgb = rgb_of(open_image(read_cell(cell, self.storage_options), PIL_MAX_PIXELS))
            if self.detr:
                return resized(Image.fromarray(rgb), self.bundle.spec.image), rgb.shape[:2], \
                    False
        except BadImage as exc:
            return str(exc)
        box, squared = self._letterbox(*rgb.shape[:2])
        return letterboxed(rgb, box), box, squared

    def _input(self, images: list[np.ndarray]) -> np.ndarray:
        if self.detr:
            return scaled(np.stack(images), self.bundle.spec.image).astype(self.dtype,
                                                                          copy=False)
        return to_input(images, self.dtype)

    def prepare(self, table: pa.Table) -> Prepared:
        column = self.spec.image_column
        cells, bad = image_cells(table[column], column)
        rows = [i for i in range(len(cells)) if i not in bad]
        by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray, Any]]] = {}
        squared = 0
        for row, result in zip(rows, self.pool.map(self.one, [cells[r] for r in rows]),
                               strict=True):
            if isinstance(result, str):
                bad[row] = result
                continue
            image, box, was_squared = result
            squared += was_squared
            by_shape.setdefault(image.shape, []).append((row, image, box))
        parts = [group[start:start + self.batching.max_rows] for group in by_shape.values()
                 for start in range(0, len(group), self.batching.max_rows)]
        return Prepared(batches=self._batches(parts), bad=bad,  # type: ignore[arg-type]
                        notes={SQUARED_NOTE: squared} if squared else {})

    def _batches(self, parts: list[list[tuple[int, np.ndarray, Any]]]) -> Iterator[Batch]:
        """Float input made as each batch is reached: a window holds 8-bit images only."""
        for part in parts:
            yield Batch(rows=np.asarray([r for r, _, _ in part], dtype=np.int64),
                        feeds={self.input_name: self._input([p for _, p, _ in part])},
                        meta=[b for _, _, b in part])

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        outs = [np.asarray(o, dtype=np.float32) for o in outputs]
        for out in outs:
            if out.ndim != 3 or out.shape[0] != len(batch):
                raise ModelError(f"task.kind: detect needs an output [batch, ...] per image, "
                                 f"the model gives {list(out.shape)}")
        s = self.spec
        values, bad = [], {}
        for i, row in enumerate(batch.rows):
            if not all(np.isfinite(out[i]).all() for out in outs):
                bad[int(row)] = "model produced non-finite values"
                continue
            if self.detr:
                found = from_detr(outs[0][i], outs[1][i], self.score_threshold,
                                  s.max_detections, *batch.meta[i])
            elif self.detection.layout == "yolo":
                found = to_image(from_raw(outs[0][i], self.score_threshold, s.iou_threshold,
                                          s.max_detections, s.class_agnostic), batch.meta[i])
            else:
                found = to_image(from_chosen(outs[0][i], self.score_threshold,
                                             s.max_detections), batch.meta[i])
            order = np.argsort(-found[:, 4], kind="stable")
            values.append([{"label": self._label(c), "score": float(score), "box": list(box)}
                           for box, score, c in zip(found[order, :4], found[order, 4],
                                                    found[order, 5], strict=True)])
        return {s.output_column: pa.array(values, pa.list_(DETECTION_TYPE))}, bad

    def _label(self, index: float) -> str:
        i = int(index)
        return self.labels[i] if 0 <= i < len(self.labels) else str(i)

"""YOLO outputs into detections, as ultralytics' ``non_max_suppression`` and ``scale_boxes``
make them, in numpy.

- Raw ``[4 + classes, anchors]`` (center x, y, width, height, then class scores): anchors whose
  best class scores above the threshold, boxes made corners, greedy NMS within each class
  (boxes offset by class x 7680, as ultralytics does; ``class_agnostic`` leaves them), the
  30,000 best kept before it and ``max_detections`` after, highest score first.
- Boxes already chosen by the graph (``nms=True`` exports, end-to-end heads), ``[n, 6]`` of
  x1, y1, x2, y2, score, class: those above the threshold, in the graph's order, at most
  ``max_detections``.
- Boxes back to the original image: padding removed, divided by separate x and y gains taken
  from the rounded resized size, clipped to the image.

DETR's outputs as transformers' ``post_process_object_detection`` reads them: a softmax over
the classes, the last ("no object") dropped, each query's best class above the threshold,
boxes from centre and size fractions to corners in the original image's pixels, not clipped.
"""

from __future__ import annotations

import numpy as np

from pipeline.tasks.letterbox import Letterbox

MAX_WH = 7680  # ultralytics' per-class offset
MAX_NMS = 30000  # boxes into NMS at most


def from_raw(prediction: np.ndarray, score_threshold: float, iou_threshold: float,
             max_detections: int, class_agnostic: bool) -> np.ndarray:
    """One image's ``[4 + classes, anchors]`` output -> ``[n, 6]`` detections."""
    x = prediction.T
    scores = x[:, 4:]
    best = scores.max(axis=1)
    x, scores, best = x[best > score_threshold], scores[best > score_threshold], \
        best[best > score_threshold]
    if not len(x):
        return np.zeros((0, 6), np.float32)
    boxes = corners(x[:, :4])
    classes = scores.argmax(axis=1).astype(np.float32)
    if len(x) > MAX_NMS:
        keep = np.argsort(-best, kind="stable")[:MAX_NMS]
        boxes, best, classes = boxes[keep], best[keep], classes[keep]
    offset = 0 if class_agnostic else classes[:, None] * MAX_WH
    kept = nms(boxes + offset, best, iou_threshold)[:max_detections]
    return np.concatenate([boxes[kept], best[kept, None], classes[kept, None]], axis=1)


def from_chosen(prediction: np.ndarray, score_threshold: float,
                max_detections: int) -> np.ndarray:
    """One image's ``[n, 6]`` boxes the graph chose -> those above the threshold."""
    return prediction[prediction[:, 4] > score_threshold][:max_detections]


def corners(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh)
    half_w, half_h = xywh[:, 2] / 2, xywh[:, 3] / 2
    out[:, 0], out[:, 1] = xywh[:, 0] - half_w, xywh[:, 1] - half_h
    out[:, 2], out[:, 3] = xywh[:, 0] + half_w, xywh[:, 1] + half_h
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS as torchvision's: by descending score, drop boxes whose IoU with a kept box
    exceeds the threshold. Indices kept, best first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def to_image(detections: np.ndarray, box: Letterbox) -> np.ndarray:
    """Boxes from the model's input back to the original image's pixels, clipped."""
    out = detections.copy()
    gain_y, gain_x = box.new_height / box.height, box.new_width / box.width
    out[:, [0, 2]] = (out[:, [0, 2]] - box.left) / gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - box.top) / gain_y
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, box.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, box.height)
    return out


def from_detr(logits: np.ndarray, boxes: np.ndarray, score_threshold: float,
              max_detections: int, height: int, width: int) -> np.ndarray:
    """One image's ``[queries, classes + 1]`` logits and ``[queries, 4]`` boxes -> ``[n, 6]``
    detections in the original image's pixels, in query order."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (shifted / shifted.sum(axis=1, keepdims=True))[:, :-1]
    best = probs.max(axis=1)
    classes = probs.argmax(axis=1).astype(np.float32)
    keep = best > score_threshold
    found = corners(boxes[keep].astype(np.float32)) * \
        np.asarray([width, height, width, height], np.float32)
    out = np.concatenate([found, best[keep, None], classes[keep, None]], axis=1)
    if len(out) > max_detections:
        out = out[np.sort(np.argsort(-out[:, 4], kind="stable")[:max_detections])]
    return out

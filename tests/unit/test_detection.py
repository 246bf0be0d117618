"""YOLO's letterbox, NMS and export reading, against ultralytics' own arithmetic (the
conformance cases compare whole predictions with ultralytics' predictor)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from pipeline.errors import ModelError
from pipeline.models.detection import read_detector, ultralytics_metadata
from pipeline.models.detr import read_detr
from pipeline.models.onnx_types import Signature, TensorInfo
from pipeline.tasks.detections import from_detr, from_raw, nms, to_image
from pipeline.tasks.images import detr_size
from pipeline.tasks.letterbox import letterbox_params, resize_bilinear

CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"


def test_a_dynamic_export_runs_at_the_stride_rectangle_a_static_one_at_the_square():
    rect = letterbox_params(480, 640, (128, 128), 32, rect=True)
    assert (rect.input_height, rect.input_width) == (96, 128)  # 640x480 runs as 128x96
    assert (rect.new_height, rect.new_width, rect.top, rect.left) == (96, 128, 0, 0)
    square = letterbox_params(480, 640, (128, 128), 32, rect=False)
    assert (square.input_height, square.input_width, square.top) == (128, 128, 16)
    tall = letterbox_params(500, 300, (128, 128), 32, rect=True)  # 77 wide: 19 of padding
    assert (tall.new_width, tall.left, tall.input_width) == (77, 9, 96)  # round(9.4), round(9.6)


def test_boxes_go_back_with_the_rounded_sizes_and_are_clipped():
    box = letterbox_params(500, 300, (128, 128), 32, rect=True)
    found = np.array([[9.0, 0.0, 86.0, 128.0, 0.9, 1.0], [0.0, -5.0, 200.0, 10.0, 0.5, 0.0]],
                     np.float32)
    back = to_image(found, box)
    assert np.allclose(back[0, :4], [0, 0, 300, 500], atol=1e-4)
    assert back[1, 0] == 0 and back[1, 2] == 300 and back[1, 1] == 0  # clipped


def test_nms_is_per_class_unless_agnostic():
    # Two overlapping boxes of different classes and a weaker duplicate of the first.
    raw = np.zeros((4 + 2, 3), np.float32)
    raw[:4, 0], raw[4, 0] = [50, 50, 20, 20], 0.9
    raw[:4, 1], raw[5, 1] = [52, 50, 20, 20], 0.8
    raw[:4, 2], raw[4, 2] = [51, 51, 20, 20], 0.6
    per_class = from_raw(raw, 0.25, 0.7, 300, class_agnostic=False)
    assert per_class[:, 4].tolist() == [np.float32(0.9), np.float32(0.8)]
    agnostic = from_raw(raw, 0.25, 0.7, 300, class_agnostic=True)
    assert agnostic[:, 4].tolist() == [np.float32(0.9)]
    assert nms(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
               np.array([0.1, 0.2], np.float32), 0.5).tolist() == [1, 0]


def test_an_nms_export_runs_at_its_export_batch_even_when_dynamic():
    """ultralytics' nms=True graphs fill only the first image of a larger batch (measured:
    batched, every image after the first came back empty), so they run at the export batch."""
    meta = ultralytics_metadata(onnx.load(str(CASES / "ultralytics_yolo_nms" / "src" /
                                              "model.onnx"), load_external_data=False))
    assert meta is not None and "'box'" in meta["names"]  # a Python dict literal
    dynamic = Signature(
        inputs=(TensorInfo("images", "tensor", onnx.TensorProto.FLOAT, ("batch", 3, "h", "w")),),
        outputs=(TensorInfo("output0", "tensor", onnx.TensorProto.FLOAT, ("batch", 300, 6)),))
    found = read_detector(meta, dynamic, "model.onnx")
    assert found["layout"] == "yolo-nms" and found["rect"] and found["max_batch"] == 1
    raw = Signature(inputs=dynamic.inputs, outputs=(
        TensorInfo("output0", "tensor", onnx.TensorProto.FLOAT, ("batch", 7, "anchors")),))
    no_nms = {**meta, "args": meta["args"].replace("'nms': True", "'nms': None")}
    assert read_detector(no_nms, raw, "model.onnx")["max_batch"] is None


def test_bilinear_resize_keeps_flat_images_flat_and_edges_in_range():
    flat = np.full((37, 53, 3), 200, np.uint8)
    assert (resize_bilinear(flat, 20, 11) == 200).all()
    ramp = np.tile(np.arange(0, 250, 5, dtype=np.uint8)[None, :, None], (8, 1, 3))
    out = resize_bilinear(ramp, 25, 4)
    assert out.shape == (4, 25, 3) and (np.diff(out[0, :, 0].astype(int)) >= 0).all()


def test_detr_sizes_bound_the_long_side_and_round_as_detr_does():
    # The short side to 96 unless the long one would pass 160; then the short side rounds.
    assert detr_size(640, 480, 96, 160) == (128, 96)
    assert detr_size(1000, 250, 96, 160) == (160, 40)
    assert detr_size(250, 1000, 96, 160) == (40, 160)
    assert detr_size(96, 150, 96, 160) == (96, 150)  # the short side already fits: kept
    assert detr_size(96, 200, 96, 160) == (77, 160)
    # raw short side 81.6: rounded to 82, while the long side is int(raw * 257 / 131) = 160.
    assert detr_size(257, 131, 96, 160) == (160, 82)


def test_detr_outputs_drop_no_object_and_scale_centre_boxes_to_the_image():
    logits = np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 0.0]], np.float32)
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]],
                     np.float32)
    found = from_detr(logits, boxes, 0.5, 300, height=100, width=200)
    # Query 1 is no object; 0 and 2 keep their query order and class.
    assert found[:, 5].tolist() == [0, 1]
    np.testing.assert_allclose(found[0, :4], [80, 30, 120, 70])
    np.testing.assert_allclose(found[1, :4], [0, 50, 100, 100])
    assert (found[:, 4] > 0.9).all()
    assert len(from_detr(logits, boxes, 0.5, 1, 100, 200)) == 1


def test_only_detr_families_are_read_as_detr():
    graph = Signature(
        inputs=(TensorInfo("pixel_values", "tensor", onnx.TensorProto.FLOAT,
                           ("b", 3, "h", "w")),),
        outputs=(TensorInfo("logits", "tensor", onnx.TensorProto.FLOAT, ("b", 100, 4)),
                 TensorInfo("pred_boxes", "tensor", onnx.TensorProto.FLOAT, ("b", 100, 4))))
    processor = {"image_processor_type": "DetrImageProcessor"}
    labels = {"0": "a", "1": "b", "2": "c"}
    assert read_detr({"model_type": "detr", "id2label": labels}, processor, graph, "m") == \
        ["a", "b", "c"]
    for config, words in (({"model_type": "deformable_detr", "id2label": labels}, "deformable_detr"),
                          ({"model_type": "detr", "id2label": {"0": "a"}}, "expected 2")):
        try:
            read_detr(config, processor, graph, "m")
        except ModelError as exc:
            assert words in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError(config)

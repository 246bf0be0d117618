"""Image demo: real photos cut into varied crops, and a small CNN image classifier as a
converter would leave it (``model.onnx`` beside ``preprocessor_config.json`` and
``config.json``), for ``python -m pipeline.models import`` to turn into a bundle.

The photos are the two scikit-learn ships (``load_sample_images``: a temple in China and a
flower, 640x427), cut into crops of random position, size and aspect ratio and saved as JPEG,
PNG or WebP, some grayscale and some RGBA, so decoding and resizing meet what a real folder
of images holds. No PyTorch here: the classifier is a plain convolutional network (four
stride-2 3x3 convolutions, global average pooling, a linear head) built with onnx's helper,
with weights drawn from a fixed seed, and CLIP's image processor settings (short side to 224,
bicubic, centre crop, CLIP's statistics). Its labels mean nothing; the pipeline's work does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipeline.models.onnx_graph import GraphBuilder, float_output

LABELS = ["temple", "roof", "sky", "tree", "petal", "leaf", "stem", "stone", "water", "cloud"]
# (output channels, stride): 224 -> 112 -> 56 -> 28 -> 14 pixels, about 0.1 GMAC an image.
STAGES = [(24, 2), (48, 2), (96, 2), (192, 2)]
PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True,
    "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}


def image_classifier(seed: int = 7) -> onnx.ModelProto:
    """The CNN: pixel_values [batch, 3, 224, 224] -> logits [batch, len(LABELS)]."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder()
    x, channels = "pixel_values", 3
    for width, stride in STAGES:
        fan_in = channels * 9
        w = g.const(rng.normal(0, np.sqrt(2 / fan_in), (width, channels, 3, 3)), dtype=np.float32)
        b = g.const(rng.normal(0, 0.01, width), dtype=np.float32)
        x = g.op("Relu", [g.op("Conv", [x, w, b], kernel_shape=[3, 3], strides=[stride, stride],
                               pads=[1, 1, 1, 1])])
        channels = width
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    head = g.const(rng.normal(0, np.sqrt(1 / channels), (channels, len(LABELS))),
                   dtype=np.float32)
    g.op("Gemm", [pooled, head, g.const(np.zeros(len(LABELS)), dtype=np.float32)], name="logits")
    pixels = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                           ["batch", 3, 224, 224])
    return g.model([pixels], [float_output("logits", ["batch", len(LABELS)])], "demo-cnn",
                   doc=f"demo image classifier: fixed random weights (seed {seed})")


def write_image_model(out: Path, seed: int = 7) -> Path:
    """A converter's folder: model.onnx, preprocessor_config.json, config.json (id2label)."""
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(image_classifier(seed), str(out / "model.onnx"))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    id2label = {str(i): name for i, name in enumerate(LABELS)}
    (out / "config.json").write_text(json.dumps(
        {"model_type": "demo-cnn", "id2label": id2label,
         "label2id": {name: int(i) for i, name in id2label.items()}}, indent=2))
    return out


def sample_photos() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def image_files(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` (name, encoded bytes): crops of the sample photos, 32 to 640 pixels a side,
    mostly JPEG (as most image data is), some PNG and WebP; about one in ten grayscale and one
    in twenty RGBA."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width = int(rng.integers(32, photo.width + 1))
        height = int(min(photo.height, max(32, width * rng.uniform(0.5, 1.5))))
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        image = photo.crop((left, top, left + width, top + height))
        roll = rng.random()
        if roll < 0.1:
            image = image.convert("L")
        elif roll < 0.15:
            image = image.convert("RGBA")
        kind = rng.choice(["JPEG"] * 6 + ["PNG", "WEBP"]) if image.mode != "RGBA" else "PNG"
        buffer = io.BytesIO()
        image.save(buffer, format=str(kind), **({} if kind == "PNG" else {"quality": 90}))
        files.append((f"img-{i:05d}.{str(kind).lower().replace('jpeg', 'jpg')}",
                      buffer.getvalue()))
    return files


def write_image_data(out: Path, count: int, seed: int = 0, truncated: int = 1) -> None:
    """``count`` image files, the last ``truncated`` of them cut in half (as an interrupted
    upload leaves them): the job dead-letters those and scores the rest."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(image_files(count, seed)):
        if i >= count - truncated:
            name, data = f"truncated-{name}", data[:len(data) // 2]
        (out / name).write_bytes(data)

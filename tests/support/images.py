"""Image files as tests use them: a folder of mixed formats, modes and sizes (with a corrupt
file), and the probabilities the demo classifier gives an image computed here, straight
through onnxruntime, to compare a job's output with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from pipeline.demo.images import sample_photos
from pipeline.models.bundle import fetch_bundle
from pipeline.tasks.images import preprocess

# (name, crop box in the photo, mode, format): every format input.format images reads, every
# mode a converter meets, sizes from smaller than the crop to the whole photo.
MIXED = [
    ("big.jpg", (0, 0, 640, 427), "RGB", "JPEG"),
    ("small.png", (300, 0, 331, 29), "RGB", "PNG"),
    ("wide.webp", (10, 300, 640, 420), "RGB", "WEBP"),
    ("tall.jpeg", (200, 50, 263, 400), "RGB", "JPEG"),
    ("gray.jpg", (100, 50, 340, 230), "L", "JPEG"),
    ("alpha.png", (50, 60, 290, 220), "RGBA", "PNG"),
    ("palette.gif", (120, 120, 385, 360), "P", "GIF"),
    ("scan.tiff", (0, 100, 250, 300), "RGB", "TIFF"),
    ("sub/nested.png", (400, 200, 600, 400), "RGB", "PNG"),
]


def encode(box: tuple[int, int, int, int], mode: str, fmt: str, photo: int = 0) -> bytes:
    image = sample_photos()[photo].crop(box).convert(mode)
    buffer = io.BytesIO()
    if fmt == "GIF":  # animated: the first frame is the one scored
        second = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(buffer, format="GIF", save_all=True, append_images=[second])
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_mixed_images(folder: Path) -> dict[str, bytes]:
    """The MIXED images, a truncated PNG and a text file; the good images' bytes by name."""
    images = {}
    for i, (name, box, mode, fmt) in enumerate(MIXED):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(box, mode, fmt, photo=i % 2))
        images[name] = path.read_bytes()
    (folder / "broken.png").write_bytes(images["small.png"][:60])
    (folder / "notes.txt").write_text("not an image, not read")
    return images


class DirectClassifier:
    """The bundle's own steps and model, with no pipeline around them."""

    def __init__(self, bundle_dir: Path) -> None:
        self.bundle = fetch_bundle(str(bundle_dir))
        self.session = ort.InferenceSession(str(self.bundle.model_path),
                                            providers=["CPUExecutionProvider"])

    def probabilities(self, data: bytes) -> np.ndarray:
        pixels = preprocess(data, self.bundle.spec.image)[None]
        logits = self.session.run(None, {"pixel_values": pixels})[0][0]
        exp = np.exp(logits - logits.max())
        return exp / exp.sum()

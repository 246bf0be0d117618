"""YOLO's input, as ultralytics' predictor makes it: the image with EXIF orientation applied
and alpha dropped, resized keeping its aspect ratio with OpenCV's bilinear filter (no
antialiasing), padded with 114 to the model's size, RGB, scaled to 0-1, NCHW.

- ``letterbox_params``: ultralytics' ``LetterBox``: the scale ``r = min(H / h, W / w)``, the
  resized size ``round(w r), round(h r)``; a dynamic export pads only to a multiple of the
  stride (a 640x480 image runs as 128x96 at imgsz 128), a static one to the full square;
  padding split ``round(d / 2 - 0.1)`` before, ``round(d / 2 + 0.1)`` after.
- ``resize_bilinear``: ``cv2.resize(..., INTER_LINEAR)`` on 8-bit images, bit for bit
  (OpenCV 5.1 as ultralytics installs it): 11-bit fixed-point weights, x clamped at the
  borders, y rows clipped with their weights kept, and the vertical pass rounded as OpenCV's
  vector code rounds it (``((a >> 4) b >> 16 ...) + 2 >> 2``). Pillow's bilinear filter
  antialiases when it shrinks, so it cannot stand in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

PAD_VALUE = 114
COEF_SCALE = 1 << 11  # OpenCV's INTER_RESIZE_COEF_SCALE


@dataclass(frozen=True)
class Letterbox:
    """Where an image went in the model's input: its resized size and the padding before it."""

    height: int  # original image
    width: int
    new_height: int  # resized, before padding
    new_width: int
    top: int
    left: int
    input_height: int  # the padded input
    input_width: int


def letterbox_params(height: int, width: int, target: tuple[int, int], stride: int,
                     rect: bool) -> Letterbox:
    r = min(target[0] / height, target[1] / width)
    new_w, new_h = max(round(width * r), 1), max(round(height * r), 1)
    dw, dh = target[1] - new_w, target[0] - new_h
    if rect:  # the smallest rectangle the stride allows
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    return Letterbox(height, width, new_h, new_w, top, left, new_h + top + bottom,
                     new_w + left + right)


def rgb_of(image: Image.Image) -> np.ndarray:
    """An image's pixels as OpenCV's ``imread`` gives them to ultralytics, in RGB: EXIF
    orientation applied, alpha dropped, grayscale and palettes made 3 channels."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGBA" or image.mode == "LA" or (image.mode == "P" and
                                                     "transparency" in image.info):
        image = image.convert("RGBA").convert("RGB")  # imread drops alpha, unblended
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def letterboxed(rgb: np.ndarray, box: Letterbox) -> np.ndarray:
    """The padded input image, ``[3, H, W]`` uint8 (``to_input`` scales a batch to 0-1: a
    window of images holds a quarter of the memory float pixels would)."""
    if (box.new_height, box.new_width) != rgb.shape[:2]:
        rgb = resize_bilinear(rgb, box.new_width, box.new_height)
    out = np.full((box.input_height, box.input_width, 3), PAD_VALUE, dtype=np.uint8)
    out[box.top:box.top + box.new_height, box.left:box.left + box.new_width] = rgb
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def to_input(images: list[np.ndarray], dtype: type) -> np.ndarray:
    """A batch of letterboxed uint8 images as the model takes them: 0-1, as ultralytics
    divides (float32 x / 255)."""
    return (np.stack(images).astype(np.float32) / np.float32(255)).astype(dtype, copy=False)


def _weights(source: int, target: int, clamp: bool) -> tuple[np.ndarray, ...]:
    scale = 1.0 / (target / source)
    f = ((np.arange(target) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s).astype(np.float32)
    if clamp:  # OpenCV clamps x at the borders; y keeps its weights over clipped rows
        low, high = s < 0, s >= source - 1
        f[low], s[low] = 0, 0
        f[high], s[high] = 0, source - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(COEF_SCALE)).astype(np.int64)
    w1 = np.rint(f * np.float32(COEF_SCALE)).astype(np.int64)
    return np.clip(s, 0, source - 1), np.clip(s + 1, 0, source - 1), w0, w1


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for uint8."""
    h, w = image.shape[:2]
    image = image.reshape(h, w, -1)
    channels = image.shape[2]
    x0, x1, a0, a1 = _weights(w, width, clamp=True)
    y0, y1, b0, b1 = _weights(h, height, clamp=False)
    # Only the source rows the vertical pass reads go through the horizontal one. int32
    # holds every intermediate: 255 x 2048 x 2 before the >> 4, 32767 x 2048 after.
    used, where = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    pixels = image[used].astype(np.int32)
    a0, a1 = a0.astype(np.int32)[None, :, None], a1.astype(np.int32)[None, :, None]
    rows = (pixels[:, x0] * a0 + pixels[:, x1] * a1).reshape(len(used), width * channels)
    rows >>= 4  # at most 32640: no clipping to int16 needed
    top, bottom = rows[where[:height]], rows[where[height:]]
    b0, b1 = b0.astype(np.int32)[:, None], b1.astype(np.int32)[:, None]
    out = (((top * b0) >> 16) + ((bottom * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8).reshape(height, width, channels)

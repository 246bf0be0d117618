"""Image inputs: decode with Pillow, then convert, resize, center-crop, rescale, normalize and
lay out as the bundle's ``image`` section says, into batches of one fixed shape.

The steps and their arithmetic are those of Hugging Face's (PIL-based) image processors, so a
bundle imported from ``preprocessor_config.json`` gets the pixels its model was trained on:
the resize is Pillow's on the 8-bit image, ``shortest_edge`` keeps the aspect ratio with the
long side truncated, the crop is centred with ``(size - crop) // 2`` and zero-padded where the
image is smaller. EXIF orientation is not applied, as there (a task that follows a pipeline,
which loads images with ``load_image``, asks for it: zero-shot over images).

A cell may hold encoded bytes (binary), a path or URI to an image file on any fsspec store
(string), or a struct with ``bytes`` and ``path`` (the Image feature of Hugging Face datasets
in Parquet). A cell that cannot become pixels (null, unreadable, undecodable, truncated, zero
size, over ``image.max_pixels``) is a dead letter with the reason; the rest goes on.

Decoding runs in a thread pool (Pillow releases the GIL while it decodes and resamples) a few
batches ahead of inference: ``Prepared.batches`` is consumed lazily, so memory holds the
window's encoded bytes and a few batches of pixels, and decoding overlaps the model.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import storage
from pipeline.errors import ConfigError, one_line
from pipeline.models.bundle import IMAGE_SOURCE, ImageSpec
from pipeline.tasks.base import Batch, Prepared

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
PREFETCH_BATCHES = 2  # decoded ahead of the batch being inferred


class BadImage(ValueError):
    """A cell that cannot become pixels; its message is the dead letter's reason."""


def decode_image(data: bytes, spec: ImageSpec, exif: bool = False) -> Image.Image:
    """The image in ``data``, loaded (``exif``: turned as its EXIF orientation says) and
    converted to the bundle's channels."""
    image = open_image(data, spec.max_pixels)
    if exif:
        image = ImageOps.exif_transpose(image)
    # Grayscale, palette, RGBA, CMYK and 16-bit images all become the model's channels: its
    # input has a fixed channel count (RGBA loses alpha, as Pillow and transformers convert).
    mode = "RGB" if spec.channels == 3 else "L"
    return image if image.mode == mode else image.convert(mode)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in ``data``, loaded as it is stored; BadImage saying why it cannot be."""
    if not data:
        raise BadImage("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow warns below its limit; ours decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width == 0 or height == 0:
                raise BadImage(f"image has zero size ({width}x{height})")
            if width * height > max_pixels:
                raise BadImage(f"image is {width}x{height} pixels, over image.max_pixels "
                               f"({max_pixels}): refused as a decompression bomb")
            image.load()  # the first frame of an animated GIF or multi-page TIFF
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"image refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise BadImage("not an image Pillow can decode") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Truncated or corrupt data: Pillow raises OSError ("image file is truncated"),
        # SyntaxError (broken PNG chunks) or ValueError.
        raise BadImage(f"corrupt image ({one_line(exc, 160)})") from exc
    return image


def resized_size(width: int, height: int, spec: ImageSpec) -> tuple[int, int]:
    """(width, height) after ``size``: exact, or the short side to ``shortest_edge`` with the
    long one scaled and truncated (transformers' ``get_resize_output_image_size``), or with
    ``longest_edge`` as DETR's processor bounds it."""
    size = spec.size
    if size.shortest_edge is None:
        return int(size.width), int(size.height)
    if size.longest_edge is not None:
        return detr_size(width, height, size.shortest_edge, size.longest_edge)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def detr_size(width: int, height: int, shortest: int, longest: int) -> tuple[int, int]:
    """(width, height) as DETR's ``get_size_with_aspect_ratio`` makes them: the short side to
    ``shortest``, unless the long side would pass ``longest``; then the short side rounds
    to what fits and the long side is truncated from the unrounded size."""
    raw = None
    low, high = float(min(width, height)), float(max(width, height))
    if high / low * shortest > longest:
        raw = longest * low / high
        shortest = round(raw)
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return width, height
    scale = raw if raw is not None else shortest
    if width < height:
        return shortest, int(scale * height / width)
    return int(scale * width / height), shortest


def resized(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One image resized and cropped, as 8-bit ``[H, W, C]``."""
    if spec.do_resize:
        target = resized_size(*image.size, spec)
        if target != image.size:
            image = image.resize(target, resample=RESAMPLE[spec.resample])
    if spec.do_center_crop:
        crop_h, crop_w = int(spec.crop_size.height), int(spec.crop_size.width)
        top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
        if (top, left, crop_w, crop_h) != (0, 0, image.width, image.height):
            image = image.crop((left, top, left + crop_w, top + crop_h))  # pads with zeros
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if not spec.any_size and array.shape[:2] != spec.height_width:
        raise BadImage(f"pixels are {array.shape[1]}x{array.shape[0]}, expected "
                       f"{spec.height_width[1]}x{spec.height_width[0]}")
    return array


def scaled(images: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """8-bit ``[..., H, W, C]`` images rescaled, normalized and laid out as float32."""
    array = images.astype(np.float32)
    if spec.do_rescale:
        array = array * np.float32(spec.rescale_factor)
    if spec.do_normalize:
        array = (array - np.asarray(spec.image_mean, np.float32)) / \
            np.asarray(spec.image_std, np.float32)
    if spec.layout == "NCHW":
        array = np.moveaxis(array, -1, -3)
    return np.ascontiguousarray(array)


def pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One image as float32 pixels of ``spec.pixel_shape``."""
    return scaled(resized(image, spec), spec)


def preprocess(data: bytes, spec: ImageSpec, exif: bool = False) -> np.ndarray:
    return pixels(decode_image(data, spec, exif), spec)


def image_encoder(bundle: Any, input_types: dict[str, str],
                  storage_options: dict[str, Any] | None, exif: bool = False) -> ImageEncoder:
    """The encoder for a bundle whose graph takes ``image.pixels``; ``exif``: images turned
    as their EXIF orientation says (as transformers' pipelines load them)."""
    name = next(n for n, s in bundle.spec.inputs.items() if s == IMAGE_SOURCE)
    if bundle.spec.image is None:
        raise ConfigError(f"model.uri: {bundle.uri} has an image input ({name}) but no 'image' "
                          "section in bundle.yaml")
    dtype = np.float16 if input_types.get(name) == "tensor(float16)" else np.float32
    return ImageEncoder(bundle.spec.image, name, np.dtype(dtype), storage_options, exif=exif)


def _worker_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class ImageEncoder:
    """An image column -> lazily decoded batches of ``max_rows`` images."""

    def __init__(self, spec: ImageSpec, input_name: str, dtype: np.dtype,
                 storage_options: dict[str, Any] | None = None, threads: int | None = None,
                 exif: bool = False):
        self.spec = spec
        self.exif = exif
        self.input_name = input_name
        self.dtype = dtype
        self.storage_options = storage_options or {}
        self.pool = ThreadPoolExecutor(threads or _worker_threads(),
                                       thread_name_prefix="image-decode")

    def cells(self, column: pa.ChunkedArray, name: str) -> tuple[list[Any], dict[int, str]]:
        return image_cells(column, name)

    def read(self, cell: bytes | str) -> bytes:
        return read_cell(cell, self.storage_options)

    def one(self, cell: bytes | str) -> np.ndarray | str:
        """Pixels, or the reason there are none."""
        try:
            return preprocess(self.read(cell), self.spec, self.exif)
        except BadImage as exc:
            return str(exc)

    def prepare(self, column: pa.ChunkedArray, name: str, max_rows: int) -> Prepared:
        cells, bad = self.cells(column, name)
        rows = [i for i in range(len(cells)) if i not in bad]
        prepared = Prepared(batches=[], bad=bad)
        prepared.batches = self._batches(cells, rows, max_rows, bad)  # type: ignore[assignment]
        return prepared

    def _batches(self, cells: list[Any], rows: list[int], max_rows: int,
                 bad: dict[int, str]) -> Iterator[Batch]:
        """Batches decoded PREFETCH_BATCHES ahead; a row that fails goes to ``bad`` as its
        batch is reached, so a batch may hold fewer than ``max_rows`` images."""
        chunks = [rows[i:i + max_rows] for i in range(0, len(rows), max_rows)]
        pending: list[list[Future]] = []
        for index in range(len(chunks) + PREFETCH_BATCHES):
            if index < len(chunks):
                pending.append([self.pool.submit(self.one, cells[r]) for r in chunks[index]])
            if index < PREFETCH_BATCHES:
                continue
            chunk, futures = chunks[index - PREFETCH_BATCHES], pending.pop(0)
            good, arrays = [], []
            for row, future in zip(chunk, futures, strict=True):
                result = future.result()
                if isinstance(result, str):
                    bad[row] = result
                else:
                    good.append(row)
                    arrays.append(result)
            if good:
                yield Batch(rows=np.asarray(good, dtype=np.int64),
                            feeds={self.input_name: np.stack(arrays).astype(self.dtype,
                                                                            copy=False)})


def image_cells(column: pa.ChunkedArray, name: str) -> tuple[list[Any], dict[int, str]]:
    """Each row's bytes, or the path to read them from (str); reasons for the others."""
    kind = column.type
    bad: dict[int, str] = {}
    if pa.types.is_struct(kind) and {"bytes", "path"} & {f.name for f in kind}:
        values = [None if v is None else (v.get("bytes") or v.get("path"))
                  for v in column.to_pylist()]
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or \
            pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = column.to_pylist()
    else:
        reason = f"column {name} has type {kind}, expected binary (image bytes) or string " \
                 "(paths)"
        return [None] * len(column), dict.fromkeys(range(len(column)), reason)
    for i, value in enumerate(values):
        if value is None:
            bad[i] = f"{name} is null"
    return values, bad


def read_cell(cell: bytes | str, storage_options: dict[str, Any]) -> bytes:
    """A cell's image bytes: the bytes themselves, or the file its path or URI names."""
    if isinstance(cell, bytes):
        return cell
    if not storage.is_local(cell) or os.path.isabs(cell.removeprefix("file://")):
        try:
            with storage.open_uri(cell, "rb", storage_options) as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise BadImage(f"image file {cell} not found") from exc
        except OSError as exc:
            raise BadImage(f"cannot read image file {cell} ({one_line(exc, 160)})") from exc
    raise BadImage(f"image path {cell!r} is relative; give absolute paths or URIs")


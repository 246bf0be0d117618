"""A bundle's ``image`` section from Hugging Face's ``preprocessor_config.json``.

The fields are the image processors' own (``size``, ``crop_size``, ``resample``,
``do_rescale``/``rescale_factor``, ``do_normalize``/``image_mean``/``image_std``, ...); the
layout (NCHW or NHWC) comes from the graph. A field we cannot express is refused in one line
naming it, whatever the processor's type (fastembed refuses whole types): a value that is a
no-op (``do_pad: false``) is no reason to refuse. Types that give a known field another
meaning are read as they mean it: ConvNext's ``crop_pct`` (resize the short side to
``shortest_edge / crop_pct``, then crop ``shortest_edge``), LeViT's scaled short side.

What is matched is the PIL-based ("slow") processor; a ``...Fast`` processor resizes with
torchvision and differs from it by a few levels per pixel.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ModelError
from pipeline.models.bundle import RESAMPLE_NAMES
from pipeline.models.onnx_types import TensorInfo

# Read into the image section (or only telling what the others mean).
USED = {"do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
        "rescale_factor", "do_normalize", "image_mean", "image_std", "crop_pct"}
# Naming, bookkeeping or output-format fields: nothing they say changes pixels.
IGNORED = {"image_processor_type", "feature_extractor_type", "processor_class",
           "_processor_class", "_valid_processor_keys", "do_convert_rgb", "return_tensors",
           "data_format", "input_data_format", "default_to_square", "disable_grouping",
           "device", "num_frames", "video_processor_type", "auto_map", "patch_size",
           "image_seq_length", "num_image_tokens"}
# Fields that change pixels in ways we do not, harmless at these values.
NO_OP = {"do_pad": (False, None), "do_flip_channel_order": (False, None),
         "do_reduce_labels": (False, True, None), "reduce_labels": (False, True, None),
         "include_top": (True, False, None), "rescale_offset": (False, None),
         "do_color_quantize": (False, None), "do_thumbnail": (False, None),
         "do_align_long_axis": (False, None), "do_split_into_patches": (False, None),
         "do_image_splitting": (False, None)}


# A detector's processor (DETR's): annotation handling, and padding to the batch's largest
# image, which never happens here (images of one size share a batch).
DETECTOR_IGNORED = {"format", "do_convert_annotations", "do_pad", "pad_size"}


def image_section(config: dict[str, Any], pixels: TensorInfo, where: str,
                  note: Any, any_size: bool = False) -> dict[str, Any]:
    """The ``image`` fields for a graph input ``pixels`` and what ``config`` (the content of
    ``where``) says; ``note(key, value, source)`` records where each value came from.
    ``any_size``: a detector's graph that takes each image at its own resized size."""
    _check_fields(config, where, any_size)
    image: dict[str, Any] = {}

    def take(key: str, value: Any, source: str | None = None) -> None:
        image[key] = value
        note(f"image.{key}", value, source or f"{where.rsplit('/', 1)[-1]} {key}")

    take("do_resize", bool(config.get("do_resize", True)))
    take("resample", _resample(config.get("resample", 2), where))
    size, crop, do_crop = _sizes(config, where, any_size, note)
    if size is not None:
        take("size", size)
    if any_size:
        if size is None or "shortest_edge" not in size or do_crop:
            raise ModelError(f"{where}: a detector's size is shortest_edge (and longest_edge), "
                             f"with no crop; this one is {config.get('size')!r}")
        take("any_size", True, "a detector's graph takes any size: images of one resized "
             "size share a batch, unpadded")
    if do_crop:
        take("do_center_crop", True)
        take("crop_size", crop)
    take("do_rescale", bool(config.get("do_rescale", True)))
    take("rescale_factor", float(config.get("rescale_factor", 1 / 255)))
    take("do_normalize", bool(config.get("do_normalize", True)))
    if image["do_normalize"]:
        take("image_mean", _triple(config.get("image_mean", 0.5)))
        take("image_std", _triple(config.get("image_std", 0.5)))
    layout, channels, source = layout_of(pixels)
    take("layout", layout, source)
    if channels == 1:
        take("channels", 1, source)
        for key in ("image_mean", "image_std"):
            if key in image:
                image[key] = image[key][:1]
    return image


def _check_fields(config: dict[str, Any], where: str, any_size: bool) -> None:
    """Refuse, naming it, a field that changes pixels in a way the pipeline does not make."""
    for key, value in config.items():
        if key in USED or key in IGNORED or (any_size and key in DETECTOR_IGNORED):
            continue
        if key in NO_OP and value in NO_OP[key]:
            continue
        raise ModelError(f"{where}: field {key} ({value!r}) changes the pixels in a way the "
                         "pipeline does not express; export the model without it, or "
                         "preprocess the images and use task kind tensor")


def _sizes(config: dict[str, Any], where: str, any_size: bool,
           note: Any) -> tuple[dict[str, int] | None, dict[str, int] | None, bool]:
    """``size``, ``crop_size`` and whether to crop, as the processor's type reads them."""
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    size = _size(config.get("size"), "size", where, any_size)
    crop = _size(config.get("crop_size"), "crop_size", where) if config.get("crop_size") else None
    do_crop = bool(config.get("do_center_crop", False)) and crop is not None
    if kind.startswith("ConvNext") and size and "shortest_edge" in size:
        size, crop, do_crop = _convnext(size, config.get("crop_pct", 224 / 256))
        note("image.size", size, f"{kind}: shortest_edge / crop_pct")
    elif kind.startswith("Levit") and size and "shortest_edge" in size:
        size = {"shortest_edge": int((256 / 224) * size["shortest_edge"])}
        note("image.size", size, f"{kind}: shortest_edge x 256/224")
    elif config.get("crop_pct") not in (None, 1, 1.0) and do_crop:
        owner = kind or "this processor"
        raise ModelError(f"{where}: field crop_pct ({config['crop_pct']!r}) of {owner} is not "
                         "expressed; the pipeline crops crop_size exactly")
    return size, crop, do_crop


def layout_of(pixels: TensorInfo) -> tuple[str, int, str]:
    """NCHW or NHWC and the channel count, from the graph's pixel input."""
    dims = pixels.dims or ()
    if len(dims) != 4:
        raise ModelError(f"graph input {pixels.name} has {len(dims) or 'unknown'} dims; an "
                         "image input is [batch, channels, height, width] or [batch, height, "
                         "width, channels]")
    second, last = dims[1], dims[3]
    if second in (1, 3):
        return "NCHW", int(second), f"dim 1 of input {pixels.name} is {second} (channels)"
    if last in (1, 3):
        return "NHWC", int(last), f"dim 3 of input {pixels.name} is {last} (channels)"
    return "NCHW", 3, f"input {pixels.name} fixes no channel dim: NCHW, as transformers exports"


def _size(value: Any, key: str, where: str, longest: bool = False) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, int):  # old feature extractors: one number, a square
        return {"height": value, "width": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict):
        if "longest_edge" in value and longest and "shortest_edge" in value:
            return {"shortest_edge": int(value["shortest_edge"]),
                    "longest_edge": int(value["longest_edge"])}
        if "longest_edge" in value:
            raise ModelError(f"{where}: field {key}.longest_edge is not expressed (the "
                             "pipeline resizes to height/width or to a shortest edge)")
        if "height" in value and "width" in value:
            return {"height": int(value["height"]), "width": int(value["width"])}
        if "shortest_edge" in value:
            return {"shortest_edge": int(value["shortest_edge"])}
    raise ModelError(f"{where}: field {key} ({value!r}) is not height/width or shortest_edge")


def _resample(value: Any, where: str) -> str:
    if isinstance(value, str) and value.lower() in RESAMPLE_NAMES:
        return value.lower()
    if isinstance(value, int) and 0 <= value < len(RESAMPLE_NAMES):
        return RESAMPLE_NAMES[value]  # PIL's numbers: 0 nearest, 1 lanczos, 2 bilinear, ...
    raise ModelError(f"{where}: field resample ({value!r}) is not a Pillow filter")


def _triple(value: Any) -> list[float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    return values * 3 if len(values) == 1 else values


def _convnext(size: dict[str, int], crop_pct: float) -> tuple[dict, dict | None, bool]:
    """ConvNextImageProcessor: below 384, resize the short side to shortest_edge / crop_pct
    and crop a shortest_edge square; from 384 up, warp to the square."""
    edge = size["shortest_edge"]
    if edge < 384:
        return {"shortest_edge": int(edge / crop_pct)}, {"height": edge, "width": edge}, True
    return {"height": edge, "width": edge}, None, False

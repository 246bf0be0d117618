"""Model bundles: a directory with model.onnx, bundle.yaml and (for text) tokenizer.json.

``fetch_bundle`` makes a bundle available on this node: local bundles are used in place,
remote ones are copied once per node into a cache directory keyed by the bundle's identity
(``pipeline.models.identity``: model, canonical bundle.yaml, tokenizer), which is computed from
the remote bundle.yaml and small files before the model is downloaded. Several processes on
one node may fetch at once; a file lock makes one of them download while the others wait and
then reuse the verified copy.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import storage
from pipeline.errors import ModelError, access_error
from pipeline.models.identity import bundle_identity, read_files, sha256_bytes
from pipeline.redaction import scrub

BUNDLE_FILE = "bundle.yaml"
TOKEN_SOURCES = ("tokens.ids", "tokens.attention_mask", "tokens.type_ids")
IMAGE_SOURCE = "image.pixels"
TEXT_SOURCE = "text"  # a string input fed the text column as it is (skl2onnx text pipelines)
LETTERBOX_SOURCE = "image.letterbox"  # YOLO's input: letterboxed RGB in 0-1 (bundle detection)
GENERATION_SOURCE = "generation.state"  # positions and KV cache, fed by the generation loop
# Pillow's resampling filters by the names Hugging Face's image processors give their numbers.
RESAMPLE_NAMES = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
PIL_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


def default_cache_dir() -> Path:
    """Read at call time so a job or test can point it elsewhere."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR", Path.home() / ".cache" / "onnx-pipeline"))


class TextSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokenizer: str = "tokenizer.json"
    max_length: int = Field(gt=1, le=8192)


class EmbeddingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # in_graph: the model already returns [batch, dim]; mean/cls: the task pools token vectors.
    pooling: Literal["in_graph", "mean", "cls"] = "in_graph"
    normalize: bool = True
    dim: int = Field(gt=0)


class ImageSize(BaseModel):
    """Either ``height`` and ``width``, or ``shortest_edge`` (aspect ratio kept, the long side
    at most ``longest_edge`` where given: DETR's), as Hugging Face's image processors write
    ``size`` and ``crop_size``."""

    model_config = ConfigDict(extra="forbid")
    height: int | None = Field(None, gt=0)
    width: int | None = Field(None, gt=0)
    shortest_edge: int | None = Field(None, gt=0)
    longest_edge: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_form(self) -> ImageSize:
        fixed = self.height is not None and self.width is not None
        if fixed == (self.shortest_edge is not None) or \
                (not fixed and (self.height is not None or self.width is not None)):
            raise ValueError("give height and width, or shortest_edge")
        if self.longest_edge is not None and self.shortest_edge is None:
            raise ValueError("longest_edge needs shortest_edge")
        return self


class ImageSpec(BaseModel):
    """How pixels are made from an image file: decode, convert, resize, center-crop, rescale,
    normalize, lay out; the fields and their order are Hugging Face's image processors'."""

    model_config = ConfigDict(extra="forbid")
    # Every image is converted to these channels (RGB, or "L" for 1): the graph's are fixed.
    channels: Literal[1, 3] = 3
    do_resize: bool = True
    size: ImageSize | None = None
    resample: Literal["nearest", "lanczos", "bilinear", "bicubic", "box", "hamming"] = "bilinear"
    do_center_crop: bool = False
    crop_size: ImageSize | None = None
    do_rescale: bool = True
    rescale_factor: float = Field(1 / 255, gt=0)
    do_normalize: bool = True
    image_mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # Larger images are dead letters, not a worker's memory blown by one decompression bomb.
    max_pixels: int = Field(PIL_MAX_PIXELS, gt=0, le=2 * PIL_MAX_PIXELS)
    # A graph that takes any size (a DETR detector): each image keeps its aspect ratio, and
    # images of one resized shape share a batch (no padding: the graph has no pixel mask).
    any_size: bool = False

    @model_validator(mode="after")
    def _fixed_shape(self) -> ImageSpec:
        if self.any_size:
            if self.do_center_crop or self.size is None or self.size.shortest_edge is None:
                raise ValueError("any_size needs size with shortest_edge and no center crop")
        elif self.size is not None and self.size.longest_edge is not None:
            raise ValueError("size.longest_edge is for any_size (a detector's input)")
        elif self.do_center_crop:
            if self.crop_size is None or self.crop_size.shortest_edge is not None:
                raise ValueError("do_center_crop needs crop_size with height and width")
        elif not (self.do_resize and self.size is not None and self.size.shortest_edge is None):
            raise ValueError("pixels of one shape need size with height and width, or a "
                             "center crop (shortest_edge alone keeps each image's aspect ratio)")
        if self.do_resize and self.size is None:
            raise ValueError("do_resize needs size")
        if self.do_normalize and not (len(self.image_mean) == len(self.image_std)
                                      == self.channels):
            raise ValueError(f"image_mean and image_std need {self.channels} values each")
        if self.do_normalize and any(v == 0 for v in self.image_std):
            raise ValueError("image_std values must not be 0")
        return self

    @property
    def height_width(self) -> tuple[int, int]:
        """The pixels' height and width once resized and cropped (for ``any_size``, a square
        of the shortest edge: a shape the graph takes, for checks)."""
        if self.any_size:
            return int(self.size.shortest_edge), int(self.size.shortest_edge)
        box = self.crop_size if self.do_center_crop else self.size
        return int(box.height), int(box.width)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """One image's shape as the graph takes it, without the batch dim."""
        h, w = self.height_width
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)


class SparseSpec(BaseModel):
    """A SPLADE model: its pooling (fused into the graph at import) and its vocabulary size."""

    model_config = ConfigDict(extra="forbid")
    pooling: Literal["max", "sum"] = "max"
    activation: Literal["relu", "log1p_relu"] = "relu"
    dim: int = Field(gt=0)


class DetectionSpec(BaseModel):
    """An object detector: how its input is made and its output read (ultralytics' YOLO, or
    a DETR whose pixels the bundle's image section describes)."""

    model_config = ConfigDict(extra="forbid")
    # yolo: [B, 4 + classes, anchors], NMS ours; yolo-nms: [B, max_det, 6] from an nms=True
    # export; yolo-end2end: [B, max_det, 6] from an end-to-end head (YOLOv10, YOLO26);
    # detr: logits [B, queries, classes + 1] (the last: no object) and pred_boxes
    # [B, queries, 4] (centre x, y, width, height as fractions of the input).
    layout: Literal["yolo", "yolo-nms", "yolo-end2end", "detr"]
    imgsz: tuple[int, int] | None = None  # height, width a YOLO model was exported at
    stride: int = Field(32, gt=0)
    # A dynamic export runs each image letterboxed to the smallest multiple of the stride
    # (rect); a static one at imgsz.
    rect: bool = False

    @model_validator(mode="after")
    def _yolo_size(self) -> DetectionSpec:
        if self.layout != "detr" and self.imgsz is None:
            raise ValueError(f"layout {self.layout} needs imgsz")
        return self


class GenerationSpec(BaseModel):
    """A text generation model: how its loop runs and when a text ends."""

    model_config = ConfigDict(extra="forbid")
    # onnx-causal: a causal LM exported with its KV cache (Optimum's text-generation-with-past),
    # run by the pipeline's own loop on onnxruntime (pipeline.models.decoding).
    # genai: an onnxruntime-genai model folder (genai_config.json beside the model), run by
    # onnxruntime-genai's own generator and KV cache.
    runtime: Literal["onnx-causal", "genai"] = "onnx-causal"
    eos_token_ids: list[int] = Field(min_length=1)  # any of them ends a text
    pad_token_id: int = Field(ge=0)  # what left padding is filled with (masked out)
    max_context: int = Field(gt=1)  # prompt and new tokens together
    # transformers' decode(clean_up_tokenization_spaces=True): " ." -> "." and the like.
    clean_up_spaces: bool = False
    # The tokenizer's chat template (Jinja, as transformers renders it) and the special tokens
    # it may name (bos_token, eos_token, ...): what task.chat and task.messages_column use.
    chat_template: str | None = None
    special_tokens: dict[str, str] = Field(default_factory=dict)


class RerankSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The score a pair gets: the raw logit, or its sigmoid (sentence-transformers' CrossEncoder
    # applies the activation its config names).
    activation: Literal["identity", "sigmoid"] = "identity"


class BundleSpec(BaseModel):
    """The content of bundle.yaml."""

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = 1
    # zero-shot: a CLIP model with both towers (a job names the labels); an NLI model is a
    # classify bundle that a zero-shot job runs.
    task: Literal["embed", "classify", "tensor", "rerank", "token-classify", "sparse-embed",
                  "detect", "zero-shot", "generate"]
    model_file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # graph input name -> what feeds it: tokens.ids | tokens.attention_mask |
    # tokens.type_ids | features | image.pixels | column:<input column>
    inputs: dict[str, str]
    # role -> graph output name (embed: embedding; classify: probabilities or logits,
    # optionally label; rerank: logits; tensor: any role, written as a column of that name)
    outputs: dict[str, str]
    text: TextSpec | None = None
    image: ImageSpec | None = None
    rerank: RerankSpec | None = None
    sparse: SparseSpec | None = None
    detection: DetectionSpec | None = None
    generation: GenerationSpec | None = None
    embedding: EmbeddingSpec | None = None
    features: list[str] | None = None  # input columns in the model's feature order
    # A features input whose converter kept no names: how many columns it takes (a job then
    # reads the input's columns other than passthrough, in file order, when there are as many).
    feature_count: int | None = Field(None, gt=0)
    labels: list[str] | None = None
    # Rows per model call at most: 1 for a graph that only runs one row at a time (a batch
    # dim hard-coded inside it); None: any batch.
    max_batch: int | None = Field(None, gt=0)
    # Weights kept beside the model (file name -> sha256): part of the bundle, its identity,
    # what is shipped and cached, and verified like the model itself.
    external_data: dict[str, str] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("inputs")
    @classmethod
    def _known_sources(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            if source not in (*TOKEN_SOURCES, "features", IMAGE_SOURCE, TEXT_SOURCE,
                              LETTERBOX_SOURCE, GENERATION_SOURCE) and \
                    not source.startswith("column:"):
                raise ValueError(
                    f"input {name!r} has source {source!r}; use one of "
                    f"{', '.join(TOKEN_SOURCES)}, features, {IMAGE_SOURCE}, {TEXT_SOURCE} or "
                    "column:<name>"
                )
        return value

    @property
    def runtime(self) -> str:
        """What loads the model: onnxruntime (``onnx``), or onnxruntime-genai (``genai``)."""
        return "genai" if self.generation is not None and \
            self.generation.runtime == "genai" else "onnx"

    def needs_tokenizer(self) -> bool:
        return any(s.startswith("tokens.") for s in self.inputs.values())

    def takes_images(self) -> bool:
        return IMAGE_SOURCE in self.inputs.values()

    def takes_letterboxed(self) -> bool:
        return LETTERBOX_SOURCE in self.inputs.values()

    def takes_raw_text(self) -> bool:
        """A string input fed the text itself, not tokens."""
        return TEXT_SOURCE in self.inputs.values()

    @property
    def modality(self) -> Literal["text", "image", "tabular"]:
        """What the rows hold: text to tokenize, images to decode, or columns as they are."""
        return "image" if self.takes_images() or self.takes_letterboxed() else \
            "text" if self.needs_tokenizer() else "tabular"


@dataclass(frozen=True)
class LocalBundle:
    """A bundle present on this node's disk, its model hash verified."""

    path: Path
    spec: BundleSpec
    uri: str

    @property
    def model_path(self) -> Path:
        return self.path / self.spec.model_file

    @property
    def tokenizer_path(self) -> Path | None:
        return self.path / self.spec.text.tokenizer if self.spec.text else None

    @property
    def sha256(self) -> str:
        return self.spec.sha256

    @functools.cached_property
    def identity(self) -> str:
        """What the job fingerprint and caches key on: everything that changes outputs
        (``pipeline.models.identity``). Computed once, when first asked for."""
        return local_identity(self.path, self.spec)


def parse_bundle_spec(text: str, where: str) -> BundleSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelError(f"{where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected a mapping at the top level")
    try:
        return BundleSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ModelError(f"{where}: key {key}: {err['msg']}") from exc


def write_bundle_spec(directory: Path, spec: BundleSpec) -> None:
    data = spec.model_dump(mode="json", exclude_none=True)
    if not data.get("external_data"):
        data.pop("external_data", None)
    (directory / BUNDLE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def read_bundle_spec(uri: str, storage_options: dict[str, Any] | None = None) -> BundleSpec:
    where = storage.join(uri, BUNDLE_FILE)
    try:
        with storage.open_uri(where, "rt", storage_options) as fh:
            text = fh.read()
    except Exception as exc:
        raise _read_error(exc, uri, BUNDLE_FILE, storage_options) from exc
    return parse_bundle_spec(text, where)


def _read_error(exc: Exception, uri: str, name: str,
                storage_options: dict[str, Any] | None) -> Exception:
    """No credentials, access denied or no bucket: one exit-2 line naming model.uri."""
    access = access_error(exc, "model.uri", uri)
    if access is not None:
        return access
    if isinstance(exc, FileNotFoundError):
        if not storage.is_local(uri):  # a missing bucket may read as a missing file
            try:
                storage.check_bucket(*storage.filesystem(uri, storage_options))
            except Exception as probe:
                return access_error(probe, "model.uri", uri) or ModelError(
                    f"model bundle {uri}: {name} not found")
        return ModelError(f"model bundle {uri}: {name} not found")
    if isinstance(exc, OSError):
        return ModelError(f"model bundle {uri}: cannot read {name} "
                          f"({scrub(str(exc), storage_options)})")
    return exc


# Hashing a large model on every load is wasteful: remember what this process verified.
_verified: dict[tuple[str, int, int], str] = {}


def verified_sha256(path: Path) -> str:
    """The file's sha256, computed once per process while its size and mtime stay."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _verified:
        _verified[key] = storage.sha256_file(str(path))
    return _verified[key]


def local_identity(path: Path, spec: BundleSpec) -> str:
    """The identity of the bundle directory ``path`` whose model matches ``spec.sha256``."""
    files = {name: storage.sha256_file(str(path / name)) if (path / name).is_file() else None
             for name in read_files(spec)}
    return bundle_identity(spec, spec.sha256, files)


def remote_identity(uri: str, spec: BundleSpec, storage_options: dict[str, Any] | None) -> str:
    """The identity of a remote bundle, reading only its small files: the model counts by
    the sha256 bundle.yaml declares, which the download then verifies."""
    files = {name: sha256_bytes(_read_remote(storage.join(uri, name), storage_options, uri))
             for name in read_files(spec)}
    return bundle_identity(spec, spec.sha256, files)


def _read_remote(where: str, storage_options: dict[str, Any] | None, uri: str) -> bytes | None:
    try:
        with storage.open_uri(where, "rb", storage_options) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        access = access_error(exc, "model.uri", uri)  # a missing bucket, not a missing file
        if access is None:
            return None
        raise access from exc
    except Exception as exc:
        raise _read_error(exc, uri, where.rsplit("/", 1)[-1], storage_options) from exc


def _check_hash(path: Path, spec: BundleSpec, uri: str, pinned: str | None) -> None:
    if not path.exists():
        raise ModelError(f"model bundle {uri}: {spec.model_file} not found")
    actual = verified_sha256(path)
    if actual != spec.sha256:
        raise ModelError(
            f"model bundle {uri}: {spec.model_file} has sha256 {actual} but bundle.yaml says "
            f"{spec.sha256}; the bundle is corrupt or was edited (re-export it)"
        )
    for name, declared in spec.external_data.items():
        data = path.parent / name
        if not data.is_file():
            raise ModelError(f"model bundle {uri}: external data {name} not found")
        found = verified_sha256(data)
        if found != declared:
            raise ModelError(f"model bundle {uri}: external data {name} has sha256 {found} but "
                             f"bundle.yaml says {declared}; the bundle is corrupt or was edited")
    if pinned and pinned != actual:
        raise ModelError(
            f"model.sha256: pinned {pinned} but {uri} holds {actual}; "
            "update the pin or point model.uri at the pinned bundle"
        )


def open_local_bundle(path: Path, uri: str, pinned_sha256: str | None = None) -> LocalBundle:
    """A bundle directory on this node, its model hash verified (``uri`` names it in errors)."""
    spec = read_bundle_spec(str(path))
    _check_hash(path / spec.model_file, spec, uri, pinned_sha256)
    return LocalBundle(path=path, spec=spec, uri=uri)


def fetch_bundle(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    pinned_sha256: str | None = None,
    cache_dir: Path | None = None,
) -> LocalBundle:
    """Make the bundle at ``uri`` available locally and verify its model hash."""
    if storage.is_local(uri):
        path = Path(uri.removeprefix("file://")).resolve()
        if not path.is_dir():
            raise ModelError(f"model bundle {uri}: not a directory")
        return open_local_bundle(path, uri, pinned_sha256)

    spec = read_bundle_spec(uri, storage_options)
    if pinned_sha256 and pinned_sha256 != spec.sha256:
        raise ModelError(
            f"model.sha256: pinned {pinned_sha256} but {uri} declares {spec.sha256}; "
            "update the pin or point model.uri at the pinned bundle"
        )
    identity = remote_identity(uri, spec, storage_options)
    root = (cache_dir or default_cache_dir()) / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    final = root / identity
    with open(root / f"{identity}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes on this node wait here
        if not cached_copy_ok(final, identity):
            _download(uri, storage_options, root, final, identity)
    spec = parse_bundle_spec((final / BUNDLE_FILE).read_text(), f"{uri}/{BUNDLE_FILE}")
    _check_hash(final / spec.model_file, spec, uri, pinned_sha256)
    return LocalBundle(path=final, spec=spec, uri=uri)


def cached_copy_ok(final: Path, identity: str) -> bool:
    """Whether the cache entry ``final`` is complete and still holds the bundle ``identity``.
    A copy damaged on disk is fetched (or unpacked) again rather than failing every job."""
    if not (final / ".complete").exists():
        return False
    try:
        spec = parse_bundle_spec((final / BUNDLE_FILE).read_text(), str(final / BUNDLE_FILE))
        model = final / spec.model_file
        return (model.is_file() and verified_sha256(model) == spec.sha256
                and local_identity(final, spec) == identity)
    except (ModelError, OSError):
        return False


@contextmanager
def cache_entry(root: Path, final: Path, marker: str, failure: str) -> Iterator[Path]:
    """A cache directory filled in a temp folder, marked complete and renamed into place, so
    no process ever sees half a bundle; ``failure`` prefixes the error when the disk fails."""
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        yield tmp
        (tmp / ".complete").write_text(marker)
        if final.exists():  # an unfinished copy from a process that died
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        raise ModelError(f"{failure} ({exc})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _download(uri: str, storage_options: dict[str, Any] | None, root: Path, final: Path,
              identity: str) -> None:
    fs, base = storage.filesystem(uri, storage_options)
    with cache_entry(root, final, identity, f"model bundle {uri}: download failed") as tmp:
        try:
            fs.get(base.rstrip("/") + "/", str(tmp), recursive=True)
        except Exception as exc:
            access = access_error(exc, "model.uri", uri)
            if access is not None:
                raise access from exc
            raise
        spec = parse_bundle_spec((tmp / BUNDLE_FILE).read_text(), f"{uri}/{BUNDLE_FILE}")
        if local_identity(tmp, spec) != identity:
            changed = " or ".join([BUNDLE_FILE, *read_files(spec)])
            raise ModelError(f"model bundle {uri}: {changed} changed while downloading; retry")
        actual = storage.sha256_file(str(tmp / spec.model_file))
        if actual != spec.sha256:
            raise ModelError(
                f"model bundle {uri}: downloaded {spec.model_file} has sha256 {actual}, "
                f"bundle.yaml says {spec.sha256}"
            )

"""Check a bundle before any worker starts: structure, runtime compatibility, smoke runs.

The same checks run from ``python -m pipeline.models validate`` and at job plan time, so a
model the installed onnxruntime cannot load fails once, in one line, with a fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from pipeline.errors import ModelError, one_line
from pipeline.models.bundle import IMAGE_SOURCE, LocalBundle
from pipeline.models.checks import (
    batch_verdict,
    load_session,
    synthesized_feeds,
    unbatched_inputs,
)
from pipeline.models.decoding import batch_agrees
from pipeline.models.generation import greedy_runner, probe_prompts
from pipeline.models.onnx_types import file_signature
from pipeline.sessions import PROVIDER_NAMES, SHORT_NAMES, SessionSettings, create_session


@dataclass(frozen=True)
class RuntimeLimits:
    max_ir_version: int
    max_opset: int


@dataclass
class ProviderCheck:
    provider: str
    loaded: bool
    detail: str


@dataclass
class ValidationReport:
    bundle: str
    ir_version: int
    opset: int
    providers: list[ProviderCheck] = field(default_factory=list)
    batches: str | None = None  # the batch check's verdict, when it ran


def _identity_model(ir_version: int, opset: int) -> bytes:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _loads(model: bytes) -> bool:
    try:
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # onnxruntime raises its own exception types
        return False


@functools.lru_cache(maxsize=1)
def runtime_limits() -> RuntimeLimits:
    """The newest IR version and default-domain opset the installed onnxruntime loads.

    onnxruntime does not expose these numbers, so they are probed with one-node models.
    """
    ir = next(v for v in range(onnx.IR_VERSION + 2, 2, -1) if _loads(_identity_model(v, 13)))
    top = onnx.defs.onnx_opset_version() + 2
    opset = next(v for v in range(top, 6, -1) if _loads(_identity_model(ir, v)))
    return RuntimeLimits(max_ir_version=ir, max_opset=opset)


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_model_file(path: str, where: str, checker: bool = True) -> onnx.ModelProto:
    """onnx checker (``checker``) plus IR/opset limits of the installed runtime."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{where}: not a readable ONNX model ({exc})") from exc
    limits = runtime_limits()
    if model.ir_version > limits.max_ir_version:
        raise ModelError(
            f"{where}: IR version {model.ir_version} is newer than onnxruntime "
            f"{ort.__version__} supports (max {limits.max_ir_version}); re-export with "
            f"model.ir_version = {limits.max_ir_version} or lower, or upgrade onnxruntime"
        )
    opset = default_opset(model)
    if opset > limits.max_opset:
        raise ModelError(
            f"{where}: opset {opset} is newer than onnxruntime {ort.__version__} supports "
            f"(max {limits.max_opset}); re-export with a lower opset or upgrade onnxruntime"
        )
    if not checker:
        return model
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: onnx checker failed: {first}") from exc
    return model


def check_io(bundle: LocalBundle, model: onnx.ModelProto) -> None:
    spec, where = bundle.spec, bundle.uri
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    graph_outputs = [o.name for o in model.graph.output]
    for name in spec.inputs:
        if name not in graph_inputs:
            raise ModelError(
                f"{where}: bundle.yaml inputs.{name} names an input the graph lacks "
                f"(graph inputs: {', '.join(graph_inputs)})"
            )
    for name in graph_inputs:
        if name not in spec.inputs:
            raise ModelError(f"{where}: graph input {name!r} is not fed by bundle.yaml inputs")
    for role, name in spec.outputs.items():
        if name not in graph_outputs:
            raise ModelError(
                f"{where}: bundle.yaml outputs.{role} names output {name!r} the graph lacks "
                f"(graph outputs: {', '.join(graph_outputs)})"
            )
    _check_task_fields(bundle)


def _check_task_fields(bundle: LocalBundle) -> None:
    spec, where = bundle.spec, bundle.uri
    if spec.needs_tokenizer():
        if spec.text is None:
            raise ModelError(f"{where}: text inputs need a 'text' section in bundle.yaml")
        if not bundle.tokenizer_path or not bundle.tokenizer_path.exists():
            raise ModelError(f"{where}: {spec.text.tokenizer} not found")
    if "features" in spec.inputs.values() and not spec.features and not spec.feature_count:
        raise ModelError(f"{where}: an input fed by 'features' needs a 'features' list or a "
                         "'feature_count'")
    if spec.task == "embed" and ("embedding" not in spec.outputs or spec.embedding is None):
        raise ModelError(f"{where}: an embed bundle needs outputs.embedding and 'embedding'")
    if spec.embedding and spec.embedding.pooling == "mean" and \
            "tokens.attention_mask" not in spec.inputs.values():
        raise ModelError(f"{where}: mean pooling needs an input fed by tokens.attention_mask")
    if spec.task == "classify" and not ({"probabilities", "logits"} & set(spec.outputs)):
        raise ModelError(f"{where}: a classify bundle needs outputs.probabilities or logits")
    if spec.task == "rerank" and (not spec.needs_tokenizer() or "logits" not in spec.outputs):
        raise ModelError(f"{where}: a rerank bundle needs token inputs and outputs.logits")
    if spec.task == "generate" and (spec.generation is None or spec.text is None
                                     or "tokens.ids" not in spec.inputs.values()):
        raise ModelError(f"{where}: a generate bundle needs a 'generation' section, a "
                         "tokenizer and an input fed by tokens.ids")
    if spec.task == "zero-shot" and (not spec.takes_images() or not spec.needs_tokenizer()
                                      or "logits" not in spec.outputs):
        raise ModelError(f"{where}: a zero-shot bundle (CLIP) needs image and token inputs "
                         "and outputs.logits (logits_per_image)")
    if spec.task == "detect" and (spec.detection is None or not spec.labels):
        raise ModelError(f"{where}: a detect bundle needs labels and a 'detection' section")
    if spec.task == "detect" and spec.detection.layout == "detr" and (
            {"logits", "boxes"} - set(spec.outputs) or not spec.takes_images()
            or spec.image is None or not spec.image.any_size):
        raise ModelError(f"{where}: a DETR detect bundle needs an input fed by image.pixels, "
                         "an image section with any_size, outputs.logits and outputs.boxes")
    if spec.task == "detect" and spec.detection.layout != "detr" and (
            "detections" not in spec.outputs or not spec.takes_letterboxed()):
        raise ModelError(f"{where}: a YOLO detect bundle needs an input fed by image.letterbox "
                         "and outputs.detections")
    if spec.task == "sparse-embed" and ("embedding" not in spec.outputs or spec.sparse is None
                                        or not spec.needs_tokenizer()):
        raise ModelError(f"{where}: a sparse-embed bundle needs token inputs, outputs.embedding "
                         "and a 'sparse' section")
    if spec.task == "token-classify" and (not spec.needs_tokenizer() or "logits" not in
                                          spec.outputs or not spec.labels):
        raise ModelError(f"{where}: a token-classify bundle needs token inputs, outputs.logits "
                         "and labels")
    if spec.takes_images() and spec.image is None:
        raise ModelError(f"{where}: an input fed by {IMAGE_SOURCE} needs an 'image' section")
    if spec.takes_images():
        _check_pixel_shape(bundle)


def _check_pixel_shape(bundle: LocalBundle) -> None:
    """The graph's fixed dims of the pixel input agree with what the image section makes."""
    graph = file_signature(bundle.model_path, bundle.sha256)
    want = bundle.spec.image.pixel_shape
    for name, source in bundle.spec.inputs.items():
        if source != IMAGE_SOURCE:
            continue
        dims = graph.input(name).row_dims
        if dims is None:
            continue
        if bundle.spec.image.any_size:  # only the channels are fixed
            channel = 0 if bundle.spec.image.layout == "NCHW" else 2
            dims = [d if i == channel else None for i, d in enumerate(dims)]
        if len(dims) != 3 or any(isinstance(d, int) and d > 0 and d != w
                                 for d, w in zip(dims, want, strict=False)):
            shown = ["?" if not isinstance(d, int) or d <= 0 else d for d in dims]
            raise ModelError(f"{bundle.uri}: graph input {name} takes images of shape {shown} "
                             f"but bundle.yaml image makes {list(want)} "
                             f"({bundle.spec.image.layout}); fix image.size, crop_size or layout")


def smoke_run(bundle: LocalBundle, provider: str) -> ProviderCheck:
    where = f"{bundle.uri}/{bundle.spec.model_file}"
    loaded = load_session(bundle, provider, where)
    if loaded.active != provider:
        return ProviderCheck(provider, False, loaded.fallback or "not loaded")
    if bundle.spec.task == "generate":
        return _generation_smoke(bundle, loaded.session, provider)
    feeds = synthesized_feeds(bundle, rows=min(2, bundle.spec.max_batch or 2))
    try:
        outputs = loaded.session.run(None, feeds)
    except Exception as exc:
        raise ModelError(f"{bundle.uri}: smoke run on {provider} failed ({exc})") from exc
    for out, meta in zip(outputs, loaded.session.get_outputs(), strict=True):
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ModelError(f"{bundle.uri}: smoke run on {provider}: {meta.name} is not finite")
    shapes = ", ".join(f"{m.name}{list(np.shape(o))}" for o, m in
                       zip(outputs, loaded.session.get_outputs(), strict=True))
    return ProviderCheck(provider, True, f"ok: {shapes}")


def _generation_smoke(bundle: LocalBundle, session: Any, provider: str) -> ProviderCheck:
    """Four greedy tokens for prompts of three lengths, batched and alone."""
    try:
        problem = batch_agrees(greedy_runner(session, bundle.spec.generation),
                               probe_prompts(str(bundle.tokenizer_path)))
    except Exception as exc:  # onnxruntime raises RuntimeError subclasses
        raise ModelError(f"{bundle.uri}: generation on {provider} failed "
                         f"({one_line(exc, 240)})") from exc
    if problem and bundle.spec.max_batch != 1:
        raise ModelError(f"{bundle.uri}: batched generation differs from one prompt at a time "
                         f"({problem}); import the model again to run it one prompt per call")
    return ProviderCheck(provider, True, "ok: 4 greedy tokens for 3 prompts" +
                         ("" if problem else ", batched and alone alike"))


def check_batches(bundle: LocalBundle) -> str:
    """Batches of 1, 2 and 7 rows give every row its own outputs (not for a bundle that runs
    one row per call); what was checked, in words."""
    if bundle.spec.max_batch == 1:
        return "runs one row per call (max_batch: 1)"
    if bundle.spec.task == "generate":  # the smoke run compares batched and alone
        smoke_run(bundle, "cpu")
        return "greedy tokens of 3 prompts batched and alone agree"
    session = create_session(str(bundle.model_path), SessionSettings()).session
    verdict = batch_verdict(session, synthesized_feeds(bundle),
                            list(dict.fromkeys(bundle.spec.outputs.values())),
                            fixed=unbatched_inputs(bundle))
    if not verdict.ok:
        raise ModelError(f"{bundle.uri}: {verdict.problem}; import the model again (python -m "
                         "pipeline.models import) to repair it or run it one row per call")
    return "batches of 1, 2 and 7 rows agree row by row"


def validate_bundle(bundle: LocalBundle, smoke: bool = True,
                    providers: list[str] | None = None, batches: bool = False) -> ValidationReport:
    """Structure and runtime checks, then a smoke run on each provider (default: all listed);
    with ``batches``, the batch check too (``check_batches``)."""
    # An onnxruntime-genai builder's graph uses onnxruntime's own ops, which onnx's checker
    # does not know; loading it (the smoke run) is its check.
    model = check_model_file(str(bundle.model_path), f"{bundle.uri}/{bundle.spec.model_file}",
                             checker=bundle.spec.runtime != "genai")
    check_io(bundle, model)
    report = ValidationReport(bundle.uri, model.ir_version, default_opset(model))
    if smoke:
        listed = [SHORT_NAMES[f] for f in ort.get_available_providers() if f in SHORT_NAMES]
        for short in providers or listed:
            if short in PROVIDER_NAMES:
                report.providers.append(smoke_run(bundle, short))
    if batches:
        report.batches = check_batches(bundle)
    return report

"""``python -m pipeline.models import``: a converter's model into a bundle, nothing written by hand.

    locate (sources) -> load and check -> fit the runtime, remove ZipMap (repairs) ->
    interpret -> write a staged bundle -> operators, batchability (checks) -> smoke run ->
    the caller's own checks (a --reference) -> moved into place

Every inferred value and every repair is recorded in ``bundle.yaml`` under ``source.import``.
Nothing is written to the target unless every check passes. ``open_model`` is the same import
for a job or ``score`` whose ``model.uri`` names a model file or a converter's folder: it
imports once into the node's cache, keyed by the source's content.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from pipeline import storage
from pipeline.errors import ModelError, one_line
from pipeline.models.bundle import (
    BUNDLE_FILE,
    BundleSpec,
    DetectionSpec,
    EmbeddingSpec,
    GenerationSpec,
    ImageSpec,
    LocalBundle,
    RerankSpec,
    SparseSpec,
    TextSpec,
    cache_entry,
    default_cache_dir,
    fetch_bundle,
    open_local_bundle,
    verified_sha256,
    write_bundle_spec,
)
from pipeline.models.checks import (
    batch_verdict,
    load_session,
    synthesized_feeds,
    unbatched_inputs,
)
from pipeline.models.decoding import batch_agrees
from pipeline.models.generation import greedy_runner, probe_prompts
from pipeline.models.interpret import Choices, Reading, interpret
from pipeline.models.onnx_types import signature
from pipeline.models.optimize import staging
from pipeline.models.repairs import (
    fit_runtime,
    portable_locale,
    remove_zipmap,
    symbolic_batch,
    unicode_words,
)
from pipeline.models.sources import ModelSource, locate
from pipeline.models.sparse_pooling import SPARSE_OUTPUT, fuse_splade_pooling
from pipeline.models.validate import validate_bundle

IMPORTER_VERSION = 2  # part of the node cache's key: a better importer imports again
MODEL_FILE = "model.onnx"

Feeds = Callable[[LocalBundle], dict[str, Any]]  # rows to check batches with
Verify = Callable[[LocalBundle], None]  # the caller's last word before the bundle is kept


@dataclass
class Imported:
    bundle: LocalBundle
    reading: Reading
    repairs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImportOptions:
    choices: Choices = field(default_factory=Choices)
    strict: bool = False  # refuse a graph that runs one row per call
    feeds: Feeds | None = None  # default: synthesized rows
    verify: Verify | None = None


def import_model(src: str | ModelSource, out: Path, options: ImportOptions = ImportOptions(),
                 storage_options: dict[str, Any] | None = None) -> Imported:
    """Import the model at ``src`` (a URI, or a source already located) into a new bundle
    directory ``out``."""
    with tempfile.TemporaryDirectory(prefix="pipeline-import-") as work:
        source = src if isinstance(src, ModelSource) else \
            locate(src, Path(work), storage_options, options.choices.model_file)
        model = _load(source)
        original = onnx.ModelProto()
        original.CopyFrom(model)
        # An onnxruntime-genai folder's graph is kept as its builder wrote it (_stage_genai):
        # onnxruntime-genai loads it, and no repair of ours would reach the file.
        genai = source.layout == "genai"
        repairs = [] if genai else fit_runtime(model, source.where)
        versions_changed = bool(repairs)
        repairs += [] if genai else portable_locale(model) + unicode_words(model)
        zipmap = remove_zipmap(model)
        if zipmap is not None:
            repairs.append(f"ZipMap node {zipmap.node!r} removed: {zipmap.probabilities} is "
                           "the probabilities output")
        reading = interpret(source, model, signature(model), zipmap, options.choices)
        if reading.sparse is not None:  # the logits never leave the graph
            mask = next((n for n, s in reading.inputs.items() if s == "tokens.attention_mask"),
                        None)
            if mask is None:
                raise ModelError(f"{source.where}: SPLADE pooling needs an attention_mask input")
            repairs.append(fuse_splade_pooling(model, reading.outputs.pop("logits"), mask,
                                               reading.sparse["pooling"],
                                               reading.sparse["activation"], source.where))
            reading.outputs["embedding"] = SPARSE_OUTPUT
        with staging(out) as tmp:
            result = _stage(source, model, reading, repairs, tmp, options)
            if versions_changed:
                repairs.append(_same_outputs(original, source, result.bundle,
                                             (options.feeds or synthesized_feeds)))
                result.bundle = _write(source, model, reading, repairs, tmp,
                                       result.bundle.spec.max_batch)
            if options.verify is not None:
                options.verify(result.bundle)
        final = open_local_bundle(out, str(out))
        return Imported(final, reading, result.repairs, result.warnings)


def _load(source: ModelSource) -> onnx.ModelProto:
    where = source.where
    try:
        model = onnx.load(str(source.model), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"{where}: not a readable ONNX model ({one_line(exc, 160)})") from exc
    if not model.graph.node:
        raise ModelError(f"{where}: the ONNX file holds no graph")
    return model


def _stage(source: ModelSource, model: onnx.ModelProto, reading: Reading, repairs: list[str],
           tmp: Path, options: ImportOptions) -> Imported:
    _stage_files(source, model, reading, repairs, tmp)
    imported = Imported(_write(source, model, reading, repairs, tmp, reading.max_batch),
                        reading, repairs)
    if reading.max_batch is not None:  # the export says how many rows a call takes
        imported.warnings.append(f"runs {reading.max_batch} row{'s' if reading.max_batch > 1 else ''}"
                                 " per call: the graph was exported for that batch (a static or "
                                 "nms=True export), and runs at it, as its framework runs it")
        imported.bundle = _write(source, model, reading, repairs, tmp, reading.max_batch,
                                 imported.warnings)
        load_session(imported.bundle, where=source.where)
        validate_bundle(imported.bundle, smoke=True, providers=["cpu"])
        return imported
    if reading.task == "generate":
        _generation_batches(imported, source, model, reading, repairs, tmp)
        validate_bundle(imported.bundle, smoke=True, providers=["cpu"])
        return imported
    feeds = (options.feeds or synthesized_feeds)(imported.bundle)
    session = load_session(imported.bundle, where=source.where).session
    verdict = batch_verdict(session, feeds, _outputs(imported.bundle),
                            fixed=unbatched_inputs(imported.bundle))
    if not verdict.ok:
        fixed = symbolic_batch(model)
        if fixed:
            _save_model(model, tmp, source.uri)
            bundle = _write(source, model, reading, repairs, tmp, None)
            verdict = batch_verdict(load_session(bundle, where=source.where).session, feeds,
                                    _outputs(bundle), fixed=unbatched_inputs(bundle))
            if verdict.ok:
                repairs.append(f"batch dim of {', '.join(fixed)} made symbolic (was fixed at 1)")
                imported.bundle = _write(source, model, reading, repairs, tmp, None)
    if not verdict.ok:
        if options.strict:
            raise ModelError(f"{source.uri}: the graph does not run batches ({verdict.problem}); "
                             "re-export it with a dynamic batch dim, or import without --strict "
                             "to run it one row per call")
        quantized = dynamic_quantization(model)
        warning = f"runs one row per call: {verdict.problem}" if quantized is None else \
            (f"runs one row per call: dynamic quantization ({quantized}): outputs depend on "
             "the batch, each batch scaled by its largest activation ({verdict.problem}); "
             "quantize statically (QDQ: onnxruntime's quantize_static) to run batches")
        imported.warnings.append(warning)
        imported.bundle = _write(source, model, reading, repairs, tmp, 1, imported.warnings)
    validate_bundle(imported.bundle, smoke=True, providers=["cpu"])
    return imported


def _generation_batches(imported: Imported, source: ModelSource, model: onnx.ModelProto,
                        reading: Reading, repairs: list[str], tmp: Path) -> None:
    """Greedy tokens of prompts batched equal those of each alone, or the model runs one
    prompt per call, with a warning that says where they differ."""
    bundle = imported.bundle
    session = load_session(bundle, where=source.where).session
    problem = batch_agrees(greedy_runner(session, bundle.spec.generation),
                           probe_prompts(str(bundle.tokenizer_path)))
    if problem:
        imported.warnings.append(f"runs one prompt per call: batched generation differs from "
                                 f"one prompt at a time ({problem})")
        imported.bundle = _write(source, model, reading, repairs, tmp, 1, imported.warnings)


def _same_outputs(original: onnx.ModelProto, source: ModelSource, bundle: LocalBundle,
                  feeds: Feeds) -> str:
    """A model brought down to the runtime's versions gives what the original gives, as
    onnx's reference evaluator runs the original (it reads any IR and opset)."""
    rows = feeds(bundle)
    try:
        from onnx.reference import ReferenceEvaluator

        if source.external:
            onnx.load_external_data_for_model(original, str(source.folder))
        kept = set(bundle.spec.outputs.values())
        names = [o.name for o in original.graph.output if o.name in kept]
        if not names:  # outputs made by a later rewrite (SPLADE pooling): none to compare
            return "outputs not compared with the original (its outputs were rewritten)"
        expected = ReferenceEvaluator(original).run(names, rows)
    except Exception as exc:  # an op the reference evaluator lacks (many ONNX-ML ones)
        return (f"outputs not compared with the original (onnx's reference evaluator: "
                f"{one_line(exc, 120)})")
    got = load_session(bundle).session.run(names, rows)
    for name, want, have in zip(names, expected, got, strict=True):
        want, have = np.asarray(want), np.asarray(have)
        same = want.shape == have.shape and (
            np.array_equal(want, have) if want.dtype.kind in "OUSb" else
            np.allclose(want, have, rtol=1e-3, atol=1e-4))
        if not same:
            raise ModelError(f"{source.where}: brought down to what onnxruntime reads, output "
                             f"{name} no longer matches the original; re-export it with "
                             "the runtime's IR version and opset")
    return f"outputs match the original on {len(next(iter(rows.values())))} rows"


def _outputs(bundle: LocalBundle) -> list[str]:
    return list(dict.fromkeys(bundle.spec.outputs.values()))


def _stage_files(source: ModelSource, model: onnx.ModelProto, reading: Reading,
                 repairs: list[str], tmp: Path) -> None:
    """The bundle's files in the staging folder: the graph, the files beside it, the
    tokenizer."""
    for name in source.external:  # weights beside the model are part of the bundle
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source.folder / name, tmp / name)
    if reading.text:
        shutil.copy2(source.configs["tokenizer.json"], tmp / "tokenizer.json")
    if source.layout == "genai":
        _stage_genai(source, tmp, repairs)
    else:
        _save_model(model, tmp, source.uri)


def _stage_genai(source: ModelSource, tmp: Path, repairs: list[str]) -> None:
    """An onnxruntime-genai folder's graph as its builder wrote it: its ops (the builder's
    SimplifiedLayerNormalization, GroupQueryAttention) are onnxruntime's, which onnx's checker
    does not know, and onnxruntime-genai loads it as it is. Its config names the file the
    bundle keeps it in."""
    shutil.copy2(source.model, tmp / MODEL_FILE)
    path = tmp / "genai_config.json"
    config = json.loads(path.read_text())
    named = config["model"]["decoder"]["filename"]
    if named != MODEL_FILE:  # another name, or a file in a subfolder
        config["model"]["decoder"]["filename"] = MODEL_FILE
        path.write_text(json.dumps(config, indent=4))
        repairs.append(f"genai_config.json: the decoder {named} kept as {MODEL_FILE}")


def _save_model(model: onnx.ModelProto, tmp: Path, uri: str) -> None:
    """Save the (changed) graph into the staged bundle and run onnx's checker on the file."""
    onnx.save_model(model, str(tmp / MODEL_FILE))
    try:
        onnx.checker.check_model(str(tmp / MODEL_FILE))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{uri}: onnx checker failed: {one_line(first, 240)}") from exc


DYNAMIC_QUANTIZATION_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                            "DynamicQuantizeLSTM", "MatMulIntegerToFloat")


def dynamic_quantization(model: onnx.ModelProto) -> str | None:
    """The first node that quantizes activations per batch (onnxruntime's quantize_dynamic)."""
    node = next((n for n in model.graph.node if n.op_type in DYNAMIC_QUANTIZATION_OPS), None)
    return None if node is None else f"{node.op_type} node {node.name or '?'!r}"


def _write(source: ModelSource, model: onnx.ModelProto, reading: Reading, repairs: list[str],
           tmp: Path, max_batch: int | None, warnings: list[str] | None = None) -> LocalBundle:
    """bundle.yaml for the model ``_save_model`` last saved, and the bundle it makes."""
    spec = BundleSpec(
        task=reading.task, model_file=MODEL_FILE, sha256=verified_sha256(tmp / MODEL_FILE),
        inputs=reading.inputs, outputs=reading.outputs,
        text=TextSpec(**reading.text) if reading.text else None,
        embedding=EmbeddingSpec(**reading.embedding) if reading.embedding else None,
        image=ImageSpec(**reading.image) if reading.image else None,
        rerank=RerankSpec(**reading.rerank) if reading.rerank else None,
        sparse=SparseSpec(**reading.sparse) if reading.sparse else None,
        detection=DetectionSpec(**reading.detection) if reading.detection else None,
        generation=GenerationSpec(**reading.generation) if reading.generation else None,
        features=reading.features, feature_count=reading.feature_count, labels=reading.labels,
        max_batch=max_batch,
        external_data={name: verified_sha256(tmp / name) for name in source.external},
        source={"importer": "pipeline.models import", "importer_version": IMPORTER_VERSION,
                "from": source.uri, "layout": source.layout,
                "producer": f"{model.producer_name} {model.producer_version}".strip(),
                "onnxruntime": ort.__version__,
                "inferred": [{"key": f.key, "value": f.value, "from": f.source}
                             for f in reading.findings],
                "repairs": list(repairs),
                **({"warnings": list(warnings)} if warnings else {})})
    write_bundle_spec(tmp, spec)
    return open_local_bundle(tmp, source.uri)


# ----------------------------------------------------------------------------- model.uri


def is_bundle(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` is a bundle (a folder with bundle.yaml) rather than a converter's output."""
    if storage.is_local(uri):
        return (Path(uri.removeprefix("file://")) / BUNDLE_FILE).is_file()
    if uri.endswith(".onnx"):
        return False
    try:
        fs, path = storage.filesystem(uri, storage_options)
        return fs.exists(f"{path.rstrip('/')}/{BUNDLE_FILE}")
    except Exception:  # no credentials, access denied, ...: fetching the bundle says it best
        return True


def open_model(uri: str, storage_options: dict[str, Any] | None = None,
               pinned_sha256: str | None = None) -> tuple[LocalBundle, bool]:
    """The bundle ``model.uri`` names, and whether it was imported from a converter's output
    (then it lives in this node's cache, and a job ships it to the workers)."""
    if is_bundle(uri, storage_options):
        return fetch_bundle(uri, storage_options, pinned_sha256), False
    if storage.is_local(uri) and not Path(uri.removeprefix("file://")).exists():
        raise ModelError(f"model.uri: {uri}: no such file or folder (a bundle, an .onnx file "
                         "or a converter's folder)")
    with tempfile.TemporaryDirectory(prefix="pipeline-source-") as work:
        source = locate(uri, Path(work), storage_options)
        key = _source_key(source)
        root = default_cache_dir() / "imported"
        root.mkdir(parents=True, exist_ok=True)
        final = root / key
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other processes on this node wait here
            if not _cached_import_ok(final, key):
                with cache_entry(root, final, key, f"model {uri}: cannot import into {root}") \
                        as tmp:
                    import_model(source, tmp / "bundle")
                    for item in (tmp / "bundle").iterdir():
                        item.rename(tmp / item.name)
                    (tmp / "bundle").rmdir()
    return open_local_bundle(final, uri, pinned_sha256), True


def _cached_import_ok(final: Path, key: str) -> bool:
    try:
        if (final / ".complete").read_text() != key:
            return False
        open_local_bundle(final, str(final))
        return True
    except (OSError, ModelError):
        return False


def _source_key(source: ModelSource) -> str:
    """The content of what the import reads, and the importer's version."""
    # Hashed once per process while a file keeps its size and mtime: a job's planning and
    # every scoring actor open the same multi-GB model without reading it again.
    files = {"model": verified_sha256(source.model),
             **{name: verified_sha256(path) for name, path in source.configs.items()},
             **{name: verified_sha256(source.folder / name) for name in source.external}}
    payload = json.dumps({"importer": IMPORTER_VERSION, "layout": source.layout,
                          "files": files}, sort_keys=True)
    return "import-" + hashlib.sha256(payload.encode()).hexdigest()[:40]

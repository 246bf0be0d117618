"""Graph rewrites that undo what converters get wrong, each reported in words for bundle.yaml.

- ``fit_runtime``: an IR version or opset newer than the installed onnxruntime reads is brought
  down (the IR stamp; ``onnx.version_converter`` for the opset).
- ``remove_zipmap``: skl2onnx and onnxmltools end classifiers with ZipMap, a sequence of
  {label: probability} maps per row; the tensor that feeds it is made the graph output, and
  the map's labels (strings stay strings) kept.
- ``symbolic_batch``: a batch dim fixed at 1 (the TorchScript exporter without
  ``dynamic_axes``) made symbolic.
- ``portable_locale``: a StringNormalizer with no locale (skl2onnx leaves it unset) makes
  onnxruntime construct en_US.UTF-8, which many machines and images lack: the session then
  fails to load. C.UTF-8 is on every Linux and maps case as Unicode does.
- ``unicode_words``: skl2onnx writes scikit-learn's ``\\w`` (Unicode in Python) as the ASCII
  class ``[a-zA-Z0-9_]+`` in its Tokenizer node, so "école" is scored as "cole"; the Unicode
  classes of onnxruntime's regex engine (RE2) match what scikit-learn matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, version_converter

from pipeline.errors import ModelError
from pipeline.models.validate import default_opset, runtime_limits

BATCH = "batch"


def fit_runtime(model: onnx.ModelProto, where: str) -> list[str]:
    """Bring IR version and opset down to what this onnxruntime reads; what was done."""
    limits = runtime_limits()
    done = []
    opset = default_opset(model)
    if opset > limits.max_opset:
        try:
            converted = version_converter.convert_version(model, limits.max_opset)
        except Exception as exc:  # the converter has no adapter for some op
            raise ModelError(f"{where}: opset {opset} is newer than onnxruntime reads (max "
                             f"{limits.max_opset}) and onnx's version converter cannot bring it "
                             f"down ({' '.join(str(exc).split())[:160]}); re-export with opset "
                             f"{limits.max_opset} or lower") from exc
        model.CopyFrom(converted)
        done.append(f"opset {opset} converted to {limits.max_opset} (onnx.version_converter)")
    if model.ir_version > limits.max_ir_version:
        done.append(f"IR version {model.ir_version} stamped {limits.max_ir_version}")
        model.ir_version = limits.max_ir_version
    return done


@dataclass(frozen=True)
class ZipMapRemoved:
    node: str
    probabilities: str  # the graph output that replaces the map
    labels: list[str]


def remove_zipmap(model: onnx.ModelProto) -> ZipMapRemoved | None:
    """Replace a ZipMap that makes a graph output by the probability tensor that feeds it."""
    outputs = {o.name: i for i, o in enumerate(model.graph.output)}
    for node in model.graph.node:
        if node.op_type != "ZipMap" or node.output[0] not in outputs:
            continue
        attrs = {a.name: a for a in node.attribute}
        if "classlabels_strings" in attrs:
            labels = [s.decode() for s in attrs["classlabels_strings"].strings]
        else:
            labels = [str(v) for v in attrs["classlabels_int64s"].ints]
        tensor = node.input[0]
        index = outputs[node.output[0]]
        batch = _batch_dim(model)
        replacement = helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT,
                                                    [batch, len(labels)])
        model.graph.output.remove(model.graph.output[index])
        model.graph.output.insert(index, replacement)
        model.graph.node.remove(node)
        return ZipMapRemoved(node.name or "ZipMap", tensor, labels)
    return None


PORTABLE_LOCALE = "C.UTF-8"
RUNTIME_DEFAULT_LOCALE = "en_US.UTF-8"


def portable_locale(model: onnx.ModelProto) -> list[str]:
    """Set StringNormalizer nodes that want en_US.UTF-8 (by default or by name) to C.UTF-8;
    what was done."""
    done = []
    for node in model.graph.node:
        if node.op_type != "StringNormalizer" or node.domain not in ("", "ai.onnx"):
            continue
        attr = next((a for a in node.attribute if a.name == "locale"), None)
        current = attr.s.decode() if attr is not None else None
        if current not in (None, RUNTIME_DEFAULT_LOCALE, "en_US.utf8"):
            continue
        if attr is None:
            node.attribute.append(helper.make_attribute("locale", PORTABLE_LOCALE))
        else:
            attr.s = PORTABLE_LOCALE.encode()
        done.append(f"StringNormalizer node {node.name or '?'!r}: locale "
                    f"{current or 'unset (onnxruntime takes ' + RUNTIME_DEFAULT_LOCALE + ')'} "
                    f"set to {PORTABLE_LOCALE}, which every Linux has (same Unicode case "
                    "mapping)")
    return done


SKL2ONNX_WORD = b"[a-zA-Z0-9_]+"
UNICODE_WORD = rb"[\pL\pN_]+"


def unicode_words(model: onnx.ModelProto) -> list[str]:
    """skl2onnx's ASCII word pattern in Tokenizer nodes made Unicode's; what was done."""
    if model.producer_name != "skl2onnx":
        return []
    done = []
    for node in model.graph.node:
        if node.op_type != "Tokenizer" or node.domain != "com.microsoft":
            continue
        for attr in node.attribute:
            if attr.name == "tokenexp" and attr.s == SKL2ONNX_WORD:
                attr.s = UNICODE_WORD
                done.append(f"Tokenizer node {node.name or '?'!r}: tokenexp "
                            f"{SKL2ONNX_WORD.decode()} (skl2onnx's ASCII reading of \\w) set to "
                            f"{UNICODE_WORD.decode()}, the words scikit-learn finds (école stays "
                            "école, not cole)")
    return done


def _batch_dim(model: onnx.ModelProto) -> int | str:
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            return dims[0].dim_param or dims[0].dim_value or BATCH
    return BATCH


def symbolic_batch(model: onnx.ModelProto) -> list[str]:
    """Make a batch dim fixed at 1 symbolic on every graph input and output; their names."""
    initializers = {i.name for i in model.graph.initializer}
    changed = []
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = BATCH
            changed.append(value.name)
    if changed:
        del model.graph.value_info[:]  # shapes inferred for batch 1 would no longer hold
    return changed


def classifier_labels(model: onnx.ModelProto, label_output: str) -> list[str] | None:
    """The class labels of the ONNX-ML classifier node that computes ``label_output``
    (LinearClassifier, TreeEnsembleClassifier, SVMClassifier, ...), or None."""
    producers = {out: node for node in model.graph.node for out in node.output}
    name = label_output
    for _ in range(4):  # through the Cast and Identity nodes converters put after it
        node = producers.get(name)
        if node is None or node.op_type not in ("Cast", "Identity"):
            break
        name = node.input[0]
    for node in model.graph.node:
        if node.domain == "ai.onnx.ml" and node.op_type.endswith("Classifier") and \
                node.output and node.output[0] == name:
            attrs = {a.name: a for a in node.attribute}
            if "classlabels_strings" in attrs:
                return [s.decode() for s in attrs["classlabels_strings"].strings]
            if "classlabels_ints" in attrs:
                return [str(v) for v in attrs["classlabels_ints"].ints]
    return None


def node_of(model: onnx.ModelProto, op_type: str, name: str | None = None) -> onnx.NodeProto | None:
    """The first node of ``op_type`` (named ``name`` when given)."""
    return next((n for n in model.graph.node
                 if n.op_type == op_type and (name is None or n.name == name)), None)

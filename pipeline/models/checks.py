"""Checks that catch what converters get wrong, run on a bundle with a real session.

- ``load_session``: the model loads in the installed onnxruntime; an operator it cannot run
  is named in one line (op, domain, opset, node).
- ``batch_verdict``: batches of 1, 2 and 7 rows give each row the outputs it gets alone (a
  batch dim fixed at 1 fails, and so does a Reshape that hard-codes it).
- ``synthesized_feeds``: rows to check with when no sample is given: token ids from the
  bundle's own tokenizer, random features, random tensors of the graph's types and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from pipeline.errors import ModelError, one_line
from pipeline.models.bundle import IMAGE_SOURCE, LETTERBOX_SOURCE, LocalBundle
from pipeline.models.onnx_types import TensorInfo, file_signature
from pipeline.sessions import LoadedSession, SessionSettings, create_genai_session, create_session

CHECK_ROWS = 7
SAMPLE_TEXTS = ("a short one", "a somewhat longer sentence about rivers and the sea",
                "numbers 1 2 3 and symbols", "hello", "the quick brown fox jumps over the dog",
                "batch checks compare every row", "seven rows in all, of different lengths")


def load_session(bundle: LocalBundle, provider: str = "cpu",
                 where: str | None = None) -> LoadedSession:
    """A session for the bundle's model; ModelError naming an operator the runtime lacks, or
    why onnxruntime cannot load it. ``where``: the file the user gave (an import's source),
    named in the error rather than the staged copy."""
    where = where or f"{bundle.uri}/{bundle.spec.model_file}"
    try:
        if bundle.spec.runtime == "genai":
            return create_genai_session(str(bundle.path), SessionSettings(providers=(provider,)))
        return create_session(str(bundle.model_path), SessionSettings(providers=(provider,)))
    except Exception as exc:  # onnxruntime raises Fail / InvalidGraph / NotImplemented
        raise ModelError(f"{where}: {operator_problem(exc, bundle.model_path)}") from exc


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name "
                        r"'([^']*)'")
_NO_SCHEMA = re.compile(r"No Op registered for (\w+) with domain_version of (\d+)")
_UNKNOWN_OP = re.compile(r"(?:\b([\w.]+):)?(\w+)\((-?\d+)\) is not a registered function/op")


def operator_problem(exc: BaseException, model_path: Any) -> str:
    """onnxruntime's refusal in one line: the operator, its domain and opset, the node."""
    text = " ".join(str(exc).split())
    graph = onnx.load(str(model_path), load_external_data=False).graph
    for pattern in (_NO_KERNEL, _NO_SCHEMA, _UNKNOWN_OP):
        match = pattern.search(text)
        if not match:
            continue
        groups = match.groups()
        op = groups[1] if pattern is _UNKNOWN_OP else groups[0]
        node = next((n for n in graph.node if n.op_type == op), None)
        domain = (node.domain if node is not None else groups[0] if pattern is _UNKNOWN_OP
                  else "") or "ai.onnx"
        version = groups[2] if pattern is _UNKNOWN_OP else groups[1]
        if version.startswith("-"):  # onnxruntime did not resolve it: the model's own import
            version = str(next((o.version for o in onnx.load(str(model_path),
                                                              load_external_data=False).opset_import
                                if (o.domain or "ai.onnx") == domain), "?"))
        name = node.name if node is not None and node.name else "?"
        return (f"operator {domain}:{op} (opset {version}) at node {name!r} is not implemented "
                f"by onnxruntime {ort.__version__}")
    return f"onnxruntime {ort.__version__} cannot load the model: {runtime_reason(text)}"


_BOILERPLATE = (re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),
                re.compile(r"Load model from \S+ failed: ?"),
                # The C++ source location and function onnxruntime puts before its reason.
                re.compile(r"\S*onnxruntime_src/\S+:\d+ (?:[\w:~<>]+(?:\([^)]*\))?"
                           r"(?:::<lambda\(\)>)? )?"))


def runtime_reason(text: str) -> str:
    """onnxruntime's reason on one line, without its error-code prefix, the path of the file
    it loaded (a staged copy, not the user's) and C++ source locations; kept whole up to 600
    characters: the reason comes last (a locale, a node)."""
    text = " ".join(text.split())
    for pattern in _BOILERPLATE:
        text = pattern.sub("", text)
    return one_line(text, 600)


@dataclass(frozen=True)
class BatchVerdict:
    ok: bool
    problem: str = ""  # why batches fail, naming the node where onnxruntime says it


def batch_verdict(session: Any, feeds: dict[str, np.ndarray], output_names: list[str],
                  rtol: float = 1e-3, atol: float = 1e-4,
                  fixed: frozenset[str] = frozenset()) -> BatchVerdict:
    """Run the rows one by one, then 2 and all of them at once, and compare each row.
    ``fixed`` inputs are fed whole to every run (a CLIP model's captions)."""
    rows = len(next(v for k, v in feeds.items() if k not in fixed))

    def run(part: slice) -> list[np.ndarray]:
        return session.run(output_names, {k: v if k in fixed else v[part]
                                          for k, v in feeds.items()})

    try:
        alone = [run(slice(i, i + 1)) for i in range(rows)]
    except Exception as exc:
        raise ModelError(f"the model fails on a single row: {_failure(exc)}") from exc
    for size in (2, rows):
        try:
            together = run(slice(0, size))
        except Exception as exc:  # the batch dim is fixed, or a node assumes it
            return BatchVerdict(False, f"a batch of {size} rows fails: {_failure(exc)}")
        for i in range(size):
            for name, batched, single in zip(output_names, together, alone[i], strict=True):
                b, s = np.asarray(batched)[i:i + 1], np.asarray(single)
                same = np.array_equal(b, s) if b.dtype.kind in "OUSb" or s.dtype.kind in "OUSb" \
                    else b.shape == s.shape and np.allclose(b, s, rtol=rtol, atol=atol)
                if not same:
                    return BatchVerdict(False, f"in a batch of {size}, row {i} of output {name} "
                                               "differs from the row run alone")
    return BatchVerdict(True)


def unbatched_inputs(bundle: LocalBundle) -> frozenset[str]:
    """Inputs a task feeds whole beside every batch: a zero-shot (CLIP) bundle's captions."""
    if bundle.spec.task != "zero-shot":
        return frozenset()
    return frozenset(n for n, s in bundle.spec.inputs.items() if s.startswith("tokens."))


def _failure(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    match = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if match:  # without the C++ source location onnxruntime puts first
        message = re.sub(r"^\S+:\d+ [^()]*\([^)]*\)\s*", "", match.group(3))
        return f"{match.group(1)} node {match.group(2)!r}: {one_line(message, 200)}"
    match = re.search(r"Got invalid dimensions for input: (\S+) for the following indices "
                      r"index: 0 Got: (\d+) Expected: (\d+)", text)
    if match:
        return f"input {match.group(1)} takes a batch of {match.group(3)} only"
    return one_line(text, 240)


def synthesized_feeds(bundle: LocalBundle, rows: int = CHECK_ROWS,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` rows for every graph input, as the bundle's task would feed them."""
    rng = np.random.default_rng(seed)
    graph = file_signature(bundle.model_path, bundle.sha256)
    spec = bundle.spec
    feeds: dict[str, np.ndarray] = {}
    tokens = _token_rows(bundle, rows) if spec.needs_tokenizer() else {}
    for info in graph.inputs:
        source = spec.inputs.get(info.name, "")
        if source.startswith("tokens."):
            feeds[info.name] = tokens[source].astype(info.numpy_dtype)
        elif source == LETTERBOX_SOURCE:  # a letterboxed image at the export size, 0-1
            feeds[info.name] = rng.random((rows, 3, *spec.detection.imgsz)).astype(
                info.numpy_dtype)
        elif source == IMAGE_SOURCE:  # pixels as the image section lays them out
            feeds[info.name] = rng.normal(size=(rows, *spec.image.pixel_shape)).astype(
                info.numpy_dtype)
        elif source == "features":
            width = len(spec.features or []) or spec.feature_count or _dim(info, 1)
            feeds[info.name] = rng.normal(size=(rows, width)).astype(info.numpy_dtype)
        else:
            feeds[info.name] = _random(info, rows, rng)
    return feeds


def _token_rows(bundle: LocalBundle, rows: int) -> dict[str, np.ndarray]:
    tokenizer = Tokenizer.from_file(str(bundle.tokenizer_path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(bundle.spec.text.max_length)
    encoded = tokenizer.encode_batch([SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(rows)])
    width = max(len(e.ids) for e in encoded)
    out = {"tokens.ids": np.zeros((rows, width), np.int64),
           "tokens.attention_mask": np.zeros((rows, width), np.int64),
           "tokens.type_ids": np.zeros((rows, width), np.int64)}
    for i, e in enumerate(encoded):
        n = len(e.ids)
        out["tokens.ids"][i, :n] = e.ids
        out["tokens.attention_mask"][i, :n] = e.attention_mask
        out["tokens.type_ids"][i, :n] = e.type_ids
    return out


def _dim(info: TensorInfo, axis: int, default: int = 3) -> int:
    dims = info.dims or ()
    value = dims[axis] if len(dims) > axis else None
    return value if isinstance(value, int) and value > 0 else default


def _random(info: TensorInfo, rows: int, rng: np.random.Generator) -> np.ndarray:
    shape = (rows, *(_dim(info, a) for a in range(1, len(info.dims or (None,)))))
    if info.elem_type == onnx.TensorProto.STRING:
        return np.array([f"x{i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    dtype = info.numpy_dtype
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)
    return rng.normal(size=shape).astype(dtype)

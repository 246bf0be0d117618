"""python -m pipeline.models optimize: a faster copy of a bundle, kept only if it stays accurate.

The candidate (``pipeline.models.optimize``: fused, fp16 or int8) is written to a temp
directory beside ``--out``, compared with its source on a sample (the gate: both score it
through ``LoadedModel``, as a job would) and moved into place only if it passes. The figures
go into bundle.yaml under ``source.optimization``: provenance, not identity (the model's sha256
already is). int8 of a text model is calibrated on demo texts, or on the even rows of
``--sample`` (then gated on its odd rows, never on what it was fitted to).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo.text import make_text_table
from pipeline.errors import ConfigError, ModelError, one_line
from pipeline.models.bundle import BundleSpec, LocalBundle, fetch_bundle
from pipeline.models.optimize import (
    Calibration,
    build_candidate,
    provider_problem,
    quiet,
    runtime_ready,
    staging,
    write_optimized_bundle,
)
from pipeline.models.validate import validate_bundle
from pipeline.scoring import LoadedModel
from pipeline.spec import BATCH_DEFAULTS
from pipeline.tasks.text import TextEncoder, load_tokenizer

GATE_SEED = 1  # demo texts the gate compares on ...
CALIBRATION_SEED = 7  # ... never the ones int8 was calibrated on
CALIBRATION_ROWS = 256
# onnxruntime's CPU provider has no float16 kernels for these ops on x86 and inserts Casts.
FP16_ON_CPU = ("the CPU provider runs float16 nodes in float32, so this gate checked the "
               "float16 weights, not float16 arithmetic: gate with --provider cuda on a GPU")


@dataclass(frozen=True)
class GateSettings:
    provider: str = "cpu"
    sample: Path | None = None
    rows: int = 500
    min_cosine: float = 0.99
    max_prob_error: float = 0.01


@dataclass(frozen=True)
class GateResult:
    metric: str  # min_cosine | max_prob_error
    value: float
    threshold: float
    rows: int
    provider: str
    sample: str
    batches: str = ""  # dynamic int8 takes one range per batch tensor: sizes matter

    @property
    def passed(self) -> bool:
        if self.metric == "min_cosine":
            return self.value >= self.threshold
        return self.value <= self.threshold

    def describe(self) -> str:
        name = self.metric.replace("_", " ")
        sign = ("<", ">=") if self.metric == "min_cosine" else (">", "<=")
        return (f"{name} {self.value:.5f} {sign[self.passed]} {self.threshold} over {self.rows} "
                f"rows ({self.sample}) on {self.provider}")


@dataclass(frozen=True)
class CalibrationTexts:
    """The texts int8 is calibrated on, and what they were."""

    texts: pa.ChunkedArray
    described: str


def demo_calibration() -> CalibrationTexts:
    table = make_text_table(CALIBRATION_ROWS, seed=CALIBRATION_SEED)
    return CalibrationTexts(table["text"],
                            f"{CALIBRATION_ROWS} demo texts, seed {CALIBRATION_SEED}")


def split_sample(sample: pa.Table, name: str) -> tuple[CalibrationTexts, pa.Table]:
    """A user's text sample: even rows calibrate (up to CALIBRATION_ROWS), odd rows gate, so
    the gate never judges int8 on the texts it was fitted to."""
    if "text" not in sample.column_names or sample.num_rows < 2:
        raise ConfigError(f"--sample {name}: a text bundle needs a 'text' column of 2 rows or "
                          f"more (half calibrate int8, half gate it)")
    even = pa.array(np.arange(0, sample.num_rows, 2)[:CALIBRATION_ROWS])
    odd = pa.array(np.arange(1, sample.num_rows, 2))
    return (CalibrationTexts(sample["text"].take(even), f"{len(even)} even rows of {name}"),
            sample.take(odd))


def calibration_feeds(bundle: LocalBundle, calibration: CalibrationTexts) -> Calibration:
    """The texts tokenized and batched as the calibrated model will see them on CPU."""
    text = bundle.spec.text
    assert text is not None and bundle.tokenizer_path is not None
    encoder = TextEncoder(load_tokenizer(str(bundle.tokenizer_path), text.max_length),
                          bundle.spec.inputs, keep_empty=False)
    sizes = BATCH_DEFAULTS["cpu"]  # the batches the calibrated model will see on CPU
    batches = encoder.prepare(calibration.texts, "text", sizes["max_rows"], sizes["max_tokens"])
    return Calibration([b.feeds for b in batches.batches], calibration.described)


# --- the gate ------------------------------------------------------------------------------

def _task(spec: BundleSpec) -> dict[str, Any]:
    if spec.task == "embed":
        return {"kind": "embed"}
    text = {"text_column": "text"} if spec.needs_tokenizer() else {}
    return {"kind": "classify", "probabilities_column": "probabilities", **text}


def sample_table(bundle: LocalBundle, gate: GateSettings) -> tuple[pa.Table, str]:
    if gate.sample is not None:
        try:
            return pq.read_table(gate.sample), gate.sample.name
        except (OSError, pa.ArrowException) as exc:
            raise ConfigError(f"--sample {gate.sample}: not a readable Parquet file ({exc})") from exc
    if not bundle.spec.needs_tokenizer():
        raise ConfigError(f"{bundle.uri} takes features, not text: pass --sample FILE.parquet "
                          "with its feature columns for the accuracy gate")
    return make_text_table(gate.rows, seed=GATE_SEED).select(["text"]), \
        f"demo texts, seed {GATE_SEED}"


def _outputs(prediction: Any, spec: BundleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(rows that scored, their output matrix) from a Prediction."""
    column = prediction.table["embedding" if spec.task == "embed" else "probabilities"]
    values = column.to_pylist()
    good = np.array([v is not None for v in values], dtype=bool)
    matrix = np.array([v for v in values if v is not None], dtype=np.float64)
    return good, matrix.reshape(int(good.sum()), -1)


def _load_for_gate(path: Path, task: dict[str, Any], provider: str, level: str) -> Any:
    try:
        with quiet():  # the fallback warning: the error below says it in its one line
            loaded = LoadedModel(str(path), task, providers=(provider,))
    except ModelError:
        raise
    except Exception as exc:  # onnxruntime's own errors: a kernel missing on this provider
        hint = "; run the gate on a GPU with --provider cuda" if provider == "cpu" else ""
        raise ModelError(f"onnxruntime {ort.__version__} cannot run the {level} model on "
                         f"{provider} ({one_line(exc, 200)}){hint}") from exc
    if loaded.session.active != provider:
        raise ModelError(f"the {level} gate cannot run on {provider} ({loaded.session.fallback})"
                         f"; run it where {provider} works, or use --provider cpu")
    return loaded


def run_gate(source: LocalBundle, candidate: Path, level: str, gate: GateSettings,
             sample: tuple[pa.Table, str]) -> GateResult:
    """Score ``sample`` (table, description) with source and candidate and compare them."""
    table, described = sample
    task, where = _task(source.spec), f"--sample {gate.sample}" if gate.sample else "gate"
    new = _load_for_gate(candidate, task, gate.provider, level)
    ref_ok, ref = _outputs(LoadedModel(str(source.path), task).predict(table, [], where), source.spec)
    new_ok, out = _outputs(new.predict(table, [], where), source.spec)
    if (ref_ok & ~new_ok).any():
        raise ModelError(f"the {level} model gave no usable output for "
                         f"{int((ref_ok & ~new_ok).sum())} sample rows the source scored")
    out = out[ref_ok[new_ok]]  # rows the source scored; the candidate scored them all
    rows = len(ref)
    if rows == 0:
        raise ConfigError(f"{where}: no row could be scored, so the gate has nothing to compare")
    sizes = new.task.batching
    batches = f"<= {sizes.max_rows} rows" + (
        f" / {sizes.max_tokens} tokens" if source.spec.text is not None else "")
    if source.spec.task == "embed":
        return GateResult("min_cosine", _min_cosine(ref, out), gate.min_cosine, rows,
                          gate.provider, described, batches)
    return GateResult("max_prob_error", float(np.abs(ref - out).max()), gate.max_prob_error,
                      rows, gate.provider, described, batches)


def _min_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    return float(((ref * out).sum(1) / np.maximum(norms, 1e-12)).min())


# --- the command ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Optimized:
    path: Path
    spec: BundleSpec
    gate: GateResult
    fusions: dict[str, int]
    size_bytes: int


def _preflight(source: LocalBundle, level: str, gate: GateSettings) -> None:
    """The refusals that need no candidate, so none of them costs minutes of work first."""
    uri = source.uri
    if source.spec.task == "tensor":
        raise ModelError(f"{uri}: optimize handles embed and classify bundles; a tensor bundle "
                         "has no accuracy measure to gate on")
    if "optimization" in source.spec.source:
        raise ModelError(f"{uri}: already optimized ({source.spec.source['optimization'].get('level')}"
                         "); optimize its source bundle instead")
    if level in ("fused", "fp16") and source.spec.text is None:
        raise ModelError(f"{uri}: --level {level} is for transformer text bundles "
                         "(onnxruntime's BERT optimizer); try --level int8")
    problem = provider_problem(gate.provider) if gate.provider != "cpu" else None
    if problem:
        raise ModelError(f"{uri}: the {level} gate cannot run on {gate.provider} ({problem}); "
                         f"run it where {gate.provider} works, or use --provider cpu")


def optimize_bundle(uri: str, out: Path, level: str, gate: GateSettings) -> Optimized:
    """Write the ``level`` copy of the bundle at ``uri`` to ``out`` if it passes the gate."""
    source = fetch_bundle(uri)
    _preflight(source, level, gate)
    sample = sample_table(source, gate)  # before minutes go into the candidate
    texts = None
    if level == "int8" and source.spec.text is not None:
        texts = demo_calibration()
        if gate.sample is not None:  # calibrated on the user's own texts, gated on other rows
            texts, rows = split_sample(sample[0], gate.sample.name)
            sample = (rows, f"{rows.num_rows} odd rows of {gate.sample.name}")
    calibration = calibration_feeds(source, texts) if texts is not None else None
    with staging(out) as tmp, tempfile.TemporaryDirectory() as work:
        candidate = build_candidate(source, level, Path(work), calibration)
        runtime_ready(candidate.model)
        record: dict[str, Any] = {
            "level": level, "recipe": candidate.recipe, "fusions": candidate.fusions,
            "from": {"sha256": source.sha256, "identity": source.identity},
            "onnxruntime": ort.__version__}
        write_optimized_bundle(source, tmp, candidate.model, record)
        try:
            result = run_gate(source, tmp, level, gate, sample)
        except ModelError as exc:
            raise ModelError(f"{uri}: {exc}; nothing written to {out}") from exc
        if not result.passed:
            raise ModelError(f"{uri}: --level {level} failed the accuracy gate: "
                             f"{result.describe()}; nothing written to {out}")
        record["gate"] = {"metric": result.metric, "value": round(result.value, 6),
                          "threshold": result.threshold, "rows": result.rows,
                          "sample": result.sample, "provider": result.provider,
                          "batches": result.batches}
        if level == "fp16" and gate.provider == "cpu":
            record["gate"]["note"] = FP16_ON_CPU
        spec = write_optimized_bundle(source, tmp, None, record)
        validate_bundle(fetch_bundle(str(tmp)), providers=[gate.provider])
        size = (tmp / spec.model_file).stat().st_size
    return Optimized(out, spec, result, candidate.fusions, size)

"""The job file: pydantic models, ${ENV} interpolation, --set overrides, secret redaction.

Unknown keys are errors; every error names the file, the key path and the value.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.providers import option_strings
from pipeline.redaction import redact as redact  # re-exported: job.json, tests
from pipeline.redaction import redact_at

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Strict):
    uri: str = Field(description="file, directory or glob; local path or fsspec URL")
    format: Literal["parquet", "ipc", "csv", "jsonl"] | None = Field(
        None, description="default: from the file extension")
    columns: list[str] | None = Field(None, description="read only these (default: what is used)")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(Strict):
    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class EmbedTaskSpec(Strict):
    kind: Literal["embed"]
    text_column: str = "text"
    output_column: str = "embedding"
    max_length: int | None = Field(None, gt=1, description="default: the bundle's max_length")
    empty_text: Literal["dead_letter", "embed"] = "dead_letter"


class ClassifyTaskSpec(Strict):
    kind: Literal["classify"]
    text_column: str | None = Field(None, description="for text classifiers")
    feature_columns: list[str] | None = Field(
        None, description="input columns in the bundle's feature order (default: its names)")
    label_column: str = "label"
    score_column: str = "score"
    probabilities_column: str | None = "probabilities"
    max_length: int | None = Field(None, gt=1)
    empty_text: Literal["dead_letter", "embed"] = "dead_letter"


class TensorTaskSpec(Strict):
    kind: Literal["tensor"]
    output_prefix: str = ""


TaskSpec = Annotated[EmbedTaskSpec | ClassifyTaskSpec | TensorTaskSpec, Field(discriminator="kind")]


# Batch sizes that suit the device, used where the job leaves them out. Measured on a 2-core
# CPU (MiniLM-L6, length-sorted, 2 threads): 2048 tokens / 64 rows ran 241 rows/s, 8192 / 128
# 214 and 16384 / 256 191: past a few hundred KB of activations, big batches fall out of the
# CPU caches. GPUs want the opposite: enough rows to fill the device. Tabular models have no
# tokens; their cost per call is fixed, so they take many rows (1024 rows ran 1.16x 256).
BATCH_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"max_tokens": 2048, "max_rows": 64, "max_rows_tabular": 1024},
    "gpu": {"max_tokens": 65536, "max_rows": 1024, "max_rows_tabular": 8192},
}


class BatchingSpec(Strict):
    max_tokens: int | None = Field(None, gt=0, description="token budget per batch (text tasks); "
                                   "default by device: 2048 on CPU, 65536 on GPU")
    max_rows: int | None = Field(None, gt=0, description="rows per batch at most; default by "
                                 "device: text 64 on CPU, 1024 on GPU; tabular 1024 / 8192")
    window_rows: int = Field(4096, gt=0, description="rows a worker reads, sorts and scores at "
                             "once: its memory is bounded by this, not by the shard or file")

    def for_device(self, device: str, text: bool) -> BatchingSpec:
        """Sizes filled in for ``device`` ("cpu", or a GPU provider) where the job left them out."""
        defaults = BATCH_DEFAULTS["cpu" if device == "cpu" else "gpu"]
        return self.model_copy(update={
            "max_tokens": self.max_tokens or defaults["max_tokens"],
            "max_rows": self.max_rows or defaults["max_rows" if text else "max_rows_tabular"],
        })


class ShardingSpec(Strict):
    rows_per_shard: int = Field(10000, gt=0)
    bytes_per_shard: int | None = Field(
        None, gt=0, description="byte target for packing small files and splitting CSV/JSONL "
        "(default: rows_per_shard x bytes per row measured on the first file)")


class ElasticPool(Strict):
    """A pool is a fixed number of actors, or ``auto``: as many as the cluster can give
    (asking the autoscaler for more), up to ``max_replicas`` and the shards left to run."""

    replicas: Annotated[int, Field(ge=0)] | Literal["auto"]
    max_replicas: int | None = Field(None, gt=0, description="upper bound for replicas: auto")

    @model_validator(mode="after")
    def _bound_only_for_auto(self) -> ElasticPool:
        if self.max_replicas is not None and self.replicas != "auto":
            raise ValueError("max_replicas applies to replicas: auto only")
        return self


class CpuPoolSpec(ElasticPool):
    replicas: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    cpus: float = Field(1.0, gt=0)
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0: one per CPU")


class GpuPoolSpec(ElasticPool):
    replicas: Annotated[int, Field(ge=0)] | Literal["auto"] = 0
    gpus: float = Field(1.0, gt=0)
    cpus: float = Field(1.0, gt=0)


class WorkersSpec(Strict):
    cpu: CpuPoolSpec = Field(default_factory=CpuPoolSpec)
    gpu: GpuPoolSpec = Field(default_factory=GpuPoolSpec)
    max_in_flight: int = Field(2, ge=1, description="shards queued per actor")
    start_timeout_s: float = Field(600.0, gt=0, description="give up if no worker starts")

    @model_validator(mode="after")
    def _some_pool(self) -> WorkersSpec:
        if self.cpu.replicas == 0 and self.gpu.replicas == 0:
            raise ValueError("cpu.replicas and gpu.replicas are both 0: no worker could run")
        return self


Provider = Literal["cpu", "cuda", "tensorrt"]


class ProvidersSpec(Strict):
    cpu: list[Provider] = Field(default_factory=lambda: ["cpu"])
    gpu: list[Provider] = Field(default_factory=lambda: ["cuda", "cpu"])
    options: dict[Provider, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_option_names(self) -> ProvidersSpec:
        # onnxruntime would only fail when a worker creates its session, or silently fall back.
        for provider, options in self.options.items():
            option_strings(provider, options)
        return self


class IndexSpec(Strict):
    """A vector index over the embeddings, built after each run's commit (Lance output)."""

    column: str | None = Field(None, description="default: the embed task's output column")
    metric: Literal["cosine", "l2", "dot"] = "cosine"
    type: Literal["IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ", "IVF_HNSW_PQ"] = "IVF_PQ"
    num_partitions: int | None = Field(None, ge=1, description="IVF partitions; default: lance chooses")
    num_sub_vectors: int | None = Field(None, ge=1, description="PQ only; default: dim / 16")


class OutputSpec(Strict):
    uri: str
    format: Literal["parquet", "delta", "lance"] = Field(
        "parquet", description="parquet: a part file per shard, visible as it commits; delta, "
        "lance: a table, one version per run, committed when the run's last shard is")
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    mode: Literal["resume", "incremental", "overwrite", "fail_if_exists"] = Field(
        "resume", description="resume: finish the job over an unchanged input; incremental: "
        "every run processes new and changed input files and retires deleted ones")
    deleted_inputs: Literal["retire", "keep"] = Field(
        "retire", description="incremental: what happens to the rows of input files that no "
        "longer exist")
    index: IndexSpec | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _index_needs_lance(self) -> OutputSpec:
        if self.index is not None and self.format != "lance":
            raise ValueError("output.index needs output.format: lance")
        return self


class StorageSpec(Strict):
    shared_filesystem: bool = Field(
        False, description="local paths name the same files on every node (NFS, FSx, GCS FUSE); "
        "lifts the multi-node check on node-local input and output paths")


class RetrySpec(Strict):
    max_attempts: int = Field(3, ge=1)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    fail_fast: bool = False
    shard_timeout_s: float = Field(3600.0, gt=0)


class BadRowsSpec(Strict):
    max_fraction: float = Field(0.01, ge=0, le=1)


class JobSpec(Strict):
    name: str = "job"
    input: InputSpec
    model: ModelSpec
    task: TaskSpec
    passthrough: list[str] = Field(default_factory=list)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    sharding: ShardingSpec = Field(default_factory=ShardingSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    providers: ProvidersSpec = Field(default_factory=ProvidersSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    bad_rows: BadRowsSpec = Field(default_factory=BadRowsSpec)

    @field_validator("passthrough")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("column names must be unique")
        return value

    @model_validator(mode="after")
    def _no_column_clash(self) -> JobSpec:
        produced = set(output_columns(self.task))
        clash = produced & set(self.passthrough)
        if clash:
            raise ValueError(f"passthrough column {sorted(clash)[0]!r} clashes with a task output")
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that changes output values (the model hash is added by the planner)."""
        return {
            "input": {"uri": self.input.uri, "format": self.input.format},
            "task": self.task.model_dump(mode="json"),
            "passthrough": list(self.passthrough),
        }


def output_columns(task: EmbedTaskSpec | ClassifyTaskSpec | TensorTaskSpec) -> list[str]:
    if isinstance(task, EmbedTaskSpec):
        return [task.output_column]
    if isinstance(task, ClassifyTaskSpec):
        cols = [task.label_column, task.score_column]
        return cols + ([task.probabilities_column] if task.probabilities_column else [])
    return []


# ----------------------------------------------------------------------------- loading


def interpolate_env(value: Any, path: str = "", keep_missing: bool = False) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a loaded YAML document."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), keep_missing)
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, f"{path}[{i}]", keep_missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if keep_missing:
            return match.group(0)
        raise ConfigError(f"{path}: environment variable {name} is not set")

    return ENV_REF.sub(repl, value)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


_TYPE_SEGMENT = re.compile(r"^(int|float|str|bool|list|dict|none|constrained-\w+)$|\[")
_TASK_KINDS = ("embed", "classify", "tensor")


def _clean_loc(loc: tuple[Any, ...]) -> str:
    """Key path without pydantic's union/discriminator segments: task.embed.x -> task.x."""
    parts = [str(p) for p in loc if not _TYPE_SEGMENT.search(str(p))]
    if len(parts) > 1 and parts[0] == "task" and parts[1] in _TASK_KINDS:
        del parts[1]
    return ".".join(parts) or "(top level)"


def validation_message(exc: ValidationError, source: str | None = None,
                       prefix: str | None = None) -> str:
    """A pydantic error as one line: ``[source: ]key.path: what is wrong (got value)``.
    ``prefix``: the key the validated value sits at (``task`` for a task spec alone)."""
    errors = [{**e, "loc": (prefix, *e["loc"]) if prefix else e["loc"]} for e in exc.errors()]
    err = errors[0]
    key = _clean_loc(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "union_tag_invalid":
        msg = f"kind must be one of {', '.join(_TASK_KINDS)}"
    # A union reports one error per alternative; count only other keys as "more".
    alternatives = [e["msg"] for e in errors if _clean_loc(e["loc"]) == key]
    if len(alternatives) > 1:
        msg = " or ".join(dict.fromkeys(m.split(",")[0] for m in alternatives))
    more = len({_clean_loc(e["loc"]) for e in errors}) - 1
    # The value as job.json would show it: nothing under storage_options, no secret names.
    path = key.split(".") if key != "(top level)" else []
    value = redact_at(path, err.get("input"))
    shown = "" if err["type"] == "missing" else f" (got {_short(value)})"
    where = f"{source}: " if source else ""
    return f"{where}{key}: {msg}{shown}" + (f" (+{more} more)" if more > 0 else "")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_yaml(path: str | Path) -> dict[str, Any]:
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: job file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read job file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` wins; mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_job(
    source: str | Path | dict[str, Any] | JobSpec | list[str | Path],
    overrides: dict[str, Any] | list[str] | None = None,
) -> tuple[dict[str, Any], str]:
    """The job document, merged and overridden but not yet interpolated, and where it came
    from (for messages). A list of files is merged in order (a job file, then profiles)."""
    if isinstance(source, JobSpec):
        data, where = source.model_dump(mode="json"), "job"
    elif isinstance(source, dict):
        data, where = json.loads(json.dumps(source)), "job"
    elif isinstance(source, list):
        data, where = {}, " + ".join(str(s) for s in source)
        for path in source:
            data = deep_merge(data, _read_yaml(path))
    else:
        data, where = _read_yaml(source), str(source)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return apply_overrides(data, overrides or {}), where


def validate_job(data: dict[str, Any], where: str, env: Literal["require", "keep"] = "require"
                 ) -> JobSpec:
    """Interpolate ``${VAR}`` and validate. ``env="keep"`` leaves unset variables as they are,
    for checks on a machine that does not hold the job's secrets (``pipeline.submit``)."""
    try:
        return JobSpec.model_validate(interpolate_env(data, keep_missing=env == "keep"))
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where)) from exc
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_spec(
    source: str | Path | dict[str, Any] | JobSpec | list[str | Path],
    overrides: dict[str, Any] | list[str] | None = None,
) -> JobSpec:
    """Read, merge, interpolate, override and validate a job; raises ConfigError in one line.

    A list of files is merged in order (a job file, then profiles from configs/).
    """
    if isinstance(source, JobSpec) and not overrides:
        return source
    return validate_job(*read_job(source, overrides))


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()

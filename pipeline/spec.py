"""The job file's schema: pydantic models of every key, with defaults and descriptions.

Unknown keys are errors. Reading a job file (YAML, profiles, ``${ENV}``, ``--set``, one-line
errors) is ``pipeline.job_file``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from pipeline.providers import option_strings


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TABLE_FORMATS = ("delta", "lance", "iceberg")


class InputSpec(Strict):
    uri: str | None = Field(None, description="file, directory or glob; local path or fsspec "
                            "URL; for a table, its location (Iceberg: its metadata file)")
    format: Literal["parquet", "ipc", "csv", "jsonl", "images", "delta", "lance",
                    "iceberg"] | None = Field(
        None, description="default: from the file extension; images: a folder or glob of "
        "JPEG/PNG/WebP/GIF/TIFF/BMP files, one row each (path, image bytes); delta, lance, "
        "iceberg: a table, read through its log or manifests at one version")
    columns: list[str] | None = Field(None, description="read only these (default: what is used)")
    version: int | None = Field(None, description="tables: the Delta or Lance version, or the "
                                "Iceberg snapshot id, to read (default: the current one when the "
                                "job plans, recorded and kept by a resume)")
    filter: str | None = Field(None, min_length=1, description="rows to score, as a SQL-like "
                               "predicate: lang = 'en' AND day >= '2026-12-01' (prunes table "
                               "files and partitions where it can)")
    table: str | None = Field(None, description="iceberg: namespace.name in input.catalog")
    catalog: dict[str, Any] = Field(default_factory=dict, description="iceberg: pyiceberg "
                                    "catalog properties (type, uri, warehouse, credentials)")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _where(self) -> InputSpec:
        if self.table is not None:
            if self.format != "iceberg":
                raise ValueError("input.table names an Iceberg table: set input.format: iceberg")
            if not self.catalog:
                raise ValueError("input.table needs input.catalog (pyiceberg catalog "
                                 "properties: type, uri, warehouse...)")
            if self.uri is not None:
                raise ValueError("give input.table with input.catalog, or input.uri, not both")
        elif self.uri is None:
            raise ValueError("input.uri is required (or input.table for an Iceberg catalog)")
        if self.version is not None and self.format not in TABLE_FORMATS:
            raise ValueError("input.version applies to tables (format delta, lance, iceberg)")
        return self

    @property
    def is_table(self) -> bool:
        return self.format in TABLE_FORMATS

    @property
    def where(self) -> str:
        """The input, for messages and identity: its URI or its catalog table."""
        return self.uri if self.uri is not None else f"iceberg table {self.table}"


class ModelSpec(Strict):
    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class ChunkingSpec(Strict):
    """Long texts cut into chunks, each embedded: a row per chunk, or their mean per text."""

    max_tokens: int | None = Field(None, gt=0, description="tokens of text a chunk holds, "
                                   "special tokens not counted (default: all the model takes)")
    overlap: int = Field(0, ge=0, description="by tokens: tokens two chunks share")
    by: Literal["tokens", "sentence"] = Field("tokens", description="tokens: windows on token "
                                              "boundaries; sentence: whole sentences packed "
                                              "up to max_tokens")
    pool: Literal["none", "mean"] = Field("none", description="none: a row per chunk "
                                          "(chunk_index, chunk_start, chunk_end); mean: one "
                                          "vector per text, the mean of its chunks' (re-"
                                          "normalized when the model normalizes)")
    max_chunks: int = Field(256, gt=0, description="a text cut into more chunks goes to the "
                            "dead letters (its chunks run in one model call)")

    @model_validator(mode="after")
    def _overlap(self) -> ChunkingSpec:
        if self.overlap and self.by == "sentence":
            raise ValueError("chunking.overlap applies to by: tokens (sentences are whole)")
        if self.max_tokens is not None and self.overlap >= self.max_tokens:
            raise ValueError("chunking.overlap must be smaller than chunking.max_tokens")
        return self


class EmbedTaskSpec(Strict):
    kind: Literal["embed"]
    text_column: str = "text"
    image_column: str = Field("image", description="for image bundles: bytes, paths or URIs")
    output_column: str = "embedding"
    max_length: int | None = Field(None, gt=1, description="default: the bundle's max_length")
    empty_text: Literal["dead_letter", "embed"] = "dead_letter"
    dimensions: int | None = Field(None, gt=0, description="keep the first N dimensions "
                                   "(Matryoshka models), re-normalized when the model "
                                   "normalizes")
    quantize: Literal["int8", "binary"] | None = Field(
        None, description="int8: round(127 x v) of unit vectors; binary: one bit a dimension "
        "(v > 0), packed into bytes, most significant bit first (sentence-transformers' "
        "ubinary)")
    chunking: ChunkingSpec | None = Field(None, description="text: embed every part of long "
                                          "texts rather than truncate them")


class ClassifyTaskSpec(Strict):
    kind: Literal["classify"]
    text_column: str | None = Field(None, description="for text classifiers")
    image_column: str = Field("image", description="for image classifiers: bytes, paths or URIs")
    feature_columns: list[str] | None = Field(
        None, description="input columns in the bundle's feature order (default: its names)")
    label_column: str = "label"
    score_column: str = "score"
    probabilities_column: str | None = "probabilities"
    max_length: int | None = Field(None, gt=1)
    empty_text: Literal["dead_letter", "embed"] = "dead_letter"


class RerankTaskSpec(Strict):
    """A cross-encoder's score for each (text, text_pair) row."""

    kind: Literal["rerank"]
    text_column: str = Field("text", description="the query, or the first text of the pair")
    pair_column: str = Field("text_pair", description="the document, or the second text")
    score_column: str = "score"
    max_length: int | None = Field(None, gt=1, description="tokens of the pair together; the "
                                   "longer side is cut first (default: the bundle's max_length)")


class TokenClassifyTaskSpec(Strict):
    """Entities in each text (NER, PII), as transformers' token-classification pipeline gives
    them: label, score, the word as the tokenizer decodes it, character offsets."""

    kind: Literal["token-classify"]
    text_column: str = "text"
    output_column: str = "entities"
    aggregation: Literal["simple", "none", "first", "average", "max"] = Field(
        "simple", description="how tokens become entities, as the pipeline's "
        "aggregation_strategy: none (one per token), simple (tokens grouped by tag), first, "
        "average, max (tokens merged into words first)")
    ignore_labels: list[str] = Field(default_factory=lambda: ["O"],
                                     description="entity groups left out")
    long_texts: Literal["truncate", "stride"] = Field(
        "truncate", description="a text longer than max_length: truncated (counted in the "
        "report), or run as overlapping windows whose entities are merged")
    stride: int = Field(32, gt=0, description="long_texts stride: tokens two windows share")
    max_windows: int = Field(256, gt=0, description="long_texts stride: a text of more "
                             "windows goes to the dead letters (they run in one model call)")
    max_length: int | None = Field(None, gt=1, description="default: the bundle's max_length")

    @model_validator(mode="after")
    def _windows_need_words(self) -> TokenClassifyTaskSpec:
        if self.long_texts == "stride" and self.aggregation == "none":
            raise ValueError("long_texts: stride merges entities; it needs an aggregation "
                             "other than none (as transformers' pipeline)")
        return self


class SparseEmbedTaskSpec(Strict):
    """SPLADE sparse vectors: the nonzero vocabulary weights of each text."""

    kind: Literal["sparse-embed"]
    text_column: str = "text"
    output_column: str = "sparse_embedding"
    max_length: int | None = Field(None, gt=1, description="default: the bundle's max_length")
    max_active_dims: int | None = Field(None, gt=0, description="keep each row's largest "
                                        "weights only (SparseEncoder's max_active_dims)")
    empty_text: Literal["dead_letter", "embed"] = "dead_letter"


class DetectTaskSpec(Strict):
    """Objects in each image, as the detector's framework finds them: ultralytics' predictor
    for a YOLO export, the image processor's ``post_process_object_detection`` for DETR."""

    kind: Literal["detect"]
    image_column: str = Field("image", description="bytes, paths or URIs")
    output_column: str = "detections"
    score_threshold: float | None = Field(None, ge=0, le=1, description="default: the "
                                          "framework's, 0.25 (ultralytics' conf) for YOLO, "
                                          "0.5 (transformers' threshold) for DETR")
    iou_threshold: float = Field(0.7, ge=0, le=1, description="ultralytics' iou (NMS)")
    max_detections: int = Field(300, gt=0, description="ultralytics' max_det")
    class_agnostic: bool = Field(False, description="NMS across classes (agnostic_nms)")


class ZeroShotTaskSpec(Strict):
    """Labels chosen by the job, scored by an NLI model over texts or a CLIP model over images,
    as transformers' zero-shot pipelines score them. A task block with ``labels`` and no
    ``kind`` is this task."""

    kind: Literal["zero-shot"] = "zero-shot"
    labels: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="the classes, in the order probabilities are written")
    template: str | None = Field(None, description="the hypothesis (NLI) or caption (CLIP) "
                                 "each label makes; default: the pipeline's, 'This example is "
                                 "{}.' or 'This is a photo of {}.'")
    multi_label: bool = Field(False, description="false: probabilities over the labels sum "
                              "to 1; true: each label's own entailment probability (NLI)")
    text_column: str = "text"
    image_column: str = Field("image", description="a CLIP model's images: bytes, paths or "
                              "URIs")
    label_column: str = "label"
    score_column: str = "score"
    probabilities_column: str | None = "probabilities"
    max_length: int | None = Field(None, gt=1, description="tokens of text and hypothesis "
                                   "together, only the text cut (default: the bundle's)")

    @field_validator("template")
    @classmethod
    def _has_slot(cls, value: str | None) -> str | None:
        if value is not None and value.format("\0") == value:
            raise ValueError("task.template needs {} where the label goes")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("task.labels: each label once")
        return value


class GenerateTaskSpec(Strict):
    """Text generated for each prompt by a causal LM, as transformers' ``generate`` gives it
    (greedy by default; sampling with a seed gives the same text on every run)."""

    kind: Literal["generate"]
    prompt_column: str = "prompt"
    messages_column: str | None = Field(None, description="chat messages (a list of {role, "
                                        "content}) instead of prompts; implies chat")
    chat: bool = Field(False, description="apply the model's chat template (a prompt becomes "
                       "the user's message), with the generation prompt")
    system: str | None = Field(None, description="a system message first (chat)")
    output_column: str = "generated"
    max_new_tokens: int = Field(256, gt=0, description="new tokens at most, whatever the "
                                "prompt's length")
    temperature: float = Field(0.0, ge=0, description="0: greedy (the most likely token)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, description="sample from the likeliest tokens "
                         "holding this much probability")
    seed: int = Field(0, ge=0, description="with sampling: a row gets the same text on every "
                      "run and in any batch")
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="a text ends before the first of these it writes")
    json_schema: dict[str, Any] | None = Field(None, description="each text is JSON held to "
                                               "this schema as it is generated; a text that "
                                               "still fails it is a dead letter")

    @model_validator(mode="after")
    def _sampling(self) -> GenerateTaskSpec:
        if self.temperature == 0 and (self.top_k or self.top_p < 1):
            raise ValueError("top_k and top_p sample: set temperature above 0")
        if self.system is not None and not self.chats:
            raise ValueError("system needs chat: true (or messages_column)")
        return self

    @property
    def chats(self) -> bool:
        return self.chat or self.messages_column is not None


class TensorTaskSpec(Strict):
    kind: Literal["tensor"]
    output_prefix: str = ""


def _task_kind(value: Any) -> str | None:
    """The kind a task block names; a block with labels and no kind is zero-shot."""
    if isinstance(value, dict):
        return value.get("kind") or ("zero-shot" if "labels" in value else None)
    return getattr(value, "kind", None)


TaskSpec = Annotated[
    Annotated[EmbedTaskSpec, Tag("embed")] | Annotated[ClassifyTaskSpec, Tag("classify")]
    | Annotated[RerankTaskSpec, Tag("rerank")]
    | Annotated[TokenClassifyTaskSpec, Tag("token-classify")]
    | Annotated[SparseEmbedTaskSpec, Tag("sparse-embed")]
    | Annotated[DetectTaskSpec, Tag("detect")]
    | Annotated[ZeroShotTaskSpec, Tag("zero-shot")] | Annotated[GenerateTaskSpec, Tag("generate")]
    | Annotated[TensorTaskSpec, Tag("tensor")],
    Discriminator(_task_kind)]


# Batch sizes that suit the device, used where the job leaves them out. Measured on a 2-core
# CPU (MiniLM-L6, length-sorted, 2 threads): 2048 tokens / 64 rows ran 241 rows/s, 8192 / 128
# 214 and 16384 / 256 191: past a few hundred KB of activations, big batches fall out of the
# CPU caches. GPUs want the opposite: enough rows to fill the device. Tabular models have no
# tokens; their cost per call is fixed, so they take many rows (1024 rows ran 1.16x 256).
# Images cost their pixels (a 224x224 image is 600 KB of float32): small batches, and windows
# of a few hundred encoded images rather than thousands.
BATCH_DEFAULTS: dict[str, dict[str, int]] = {
    "cpu": {"max_tokens": 2048, "max_rows": 64, "max_rows_tabular": 1024, "max_rows_image": 16,
            "window_rows_image": 256},
    "gpu": {"max_tokens": 65536, "max_rows": 1024, "max_rows_tabular": 8192,
            "max_rows_image": 128, "window_rows_image": 1024},
}
DEFAULT_WINDOW_ROWS = 4096


class BatchingSpec(Strict):
    max_tokens: int | None = Field(None, gt=0, description="token budget per batch (text tasks); "
                                   "default by device: 2048 on CPU, 65536 on GPU")
    max_rows: int | None = Field(None, gt=0, description="rows per batch at most; default by "
                                 "device: text 64 on CPU, 1024 on GPU; tabular 1024 / 8192")
    window_rows: int | None = Field(None, gt=0, description="rows a worker reads, sorts and "
                                    "scores at once: its memory is bounded by this, not by the "
                                    "shard or file; default 4096, images 256 on CPU / 1024 on GPU")

    def for_device(self, device: str, modality: str) -> BatchingSpec:
        """Sizes filled in for ``device`` ("cpu", or a GPU provider) and what the rows hold
        ("text", "image" or "tabular") where the job left them out."""
        defaults = BATCH_DEFAULTS["cpu" if device == "cpu" else "gpu"]
        rows = {"text": "max_rows", "image": "max_rows_image"}.get(modality, "max_rows_tabular")
        window = defaults["window_rows_image"] if modality == "image" else DEFAULT_WINDOW_ROWS
        return self.model_copy(update={
            "max_tokens": self.max_tokens or defaults["max_tokens"],
            "max_rows": self.max_rows or defaults[rows],
            "window_rows": self.window_rows or window,
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
    """A vector index over the embeddings, built after each run's commit (Lance output).
    The one validator of these options; ``pipeline.sinks.lance_index`` resolves the defaults
    that depend on the output's columns."""

    column: str | None = Field(None, description="default: 'embedding', else the only vector "
                               "column")
    metric: Literal["cosine", "l2", "dot"] = "cosine"
    type: Literal["IVF_PQ", "IVF_FLAT", "IVF_SQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ",
                  "IVF_HNSW_FLAT"] = "IVF_PQ"
    num_partitions: int | None = Field(None, ge=1, description="IVF partitions; default: lance chooses")
    num_sub_vectors: int | None = Field(None, ge=1, description="PQ types; must divide the "
                                        "dimension; default: its largest divisor <= dim / 16")
    num_bits: Literal[4, 8] | None = Field(None, description="PQ types (lance takes 4 or 8); "
                                           "default 8")
    name: str | None = Field(None, min_length=1, description="default: <column>_idx")
    min_rows: int | None = Field(None, ge=1, description="rows below which no index is built; "
                                 "default 2**num_bits (PQ types), else num_partitions or 1")


class OutputSpec(Strict):
    uri: str = Field(description="where part files and the job's state (_pipeline/) go; for "
                     "delta and lance the table itself")
    format: Literal["parquet", "delta", "lance", "iceberg"] = Field(
        "parquet", description="parquet: a part file per shard, visible as it commits; delta, "
        "lance, iceberg: a table, one version (snapshot) per run, committed when the run's "
        "last shard is")
    table: str | None = Field(None, description="iceberg: namespace.name in output.catalog "
                              "(created on the first run); merge into a Delta or Lance table "
                              "elsewhere than output.uri (the input table itself, say): its URI")
    catalog: dict[str, Any] = Field(default_factory=dict, description="iceberg: pyiceberg "
                                    "catalog properties (type, uri, warehouse, credentials)")
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    mode: Literal["resume", "incremental", "overwrite", "fail_if_exists", "merge"] = Field(
        "resume", description="resume: finish the job over an unchanged input; incremental: "
        "every run processes new and changed input files and retires deleted ones; merge "
        "(tables): each run upserts its rows into the table by output.key")
    key: list[str] | None = Field(None, min_length=1, description="merge: the columns that "
                                  "identify a row (passthrough columns)")
    deleted_inputs: Literal["retire", "keep"] = Field(
        "retire", description="incremental: what happens to the rows of input files that no "
        "longer exist")
    index: IndexSpec | None = None
    lease_timeout_s: float = Field(
        60.0, ge=1, description="one driver per output: a lease (_pipeline/lease.json) renewed "
        "every quarter of this; a holder that stops renewing for this long is taken over")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _index_needs_lance(self) -> OutputSpec:
        if self.index is not None and self.format != "lance":
            raise ValueError("output.index needs output.format: lance")
        if self.format == "iceberg" and (not self.table or not self.catalog):
            raise ValueError("output.format iceberg needs output.table (namespace.name) and "
                             "output.catalog (pyiceberg catalog properties)")
        if self.format != "iceberg" and self.catalog:
            raise ValueError("output.catalog applies to output.format: iceberg")
        if self.format != "iceberg" and self.table and self.mode != "merge":
            raise ValueError("output.table applies to output.format: iceberg, or to "
                             "output.mode: merge (the Delta or Lance table to merge into)")
        if self.mode == "merge" and self.format == "parquet":
            raise ValueError("output.mode merge needs a table: output.format delta, lance or "
                             "iceberg")
        if (self.mode == "merge") != (self.key is not None):
            raise ValueError("output.mode merge and output.key go together")
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
    max_split_attempts: int = Field(
        64, ge=0, description="extra attempts a shard may spend isolating rows that kill its "
        "worker process or run it out of memory (retried alone, then in halves down to single "
        "rows, which are dead-lettered); 0: no isolation")


class BadRowsSpec(Strict):
    max_fraction: float = Field(0.01, ge=0, le=1)


class JobSpec(Strict):
    name: str = "job"
    input: InputSpec
    model: ModelSpec
    task: TaskSpec | None = Field(None, description="default: the bundle's own task, every "
                                  "column at its conventional name")
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
        clash = output_clash(self.task, self.passthrough) if self.task is not None else None
        if clash:
            raise ValueError(clash)
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that changes output values (the model hash is added by the planner)."""
        source = {"uri": self.input.uri, "format": self.input.format}
        # Keys only where set: outputs of jobs from before they existed keep their fingerprint.
        source.update({k: v for k, v in (("table", self.input.table),
                                         ("filter", self.input.filter)) if v is not None})
        return {
            "input": source,
            "task": _fingerprint_task(self.task),
            "passthrough": list(self.passthrough),
        }


# Task keys added after a kind first shipped, with the default that leaves outputs as they
# were: left out of the fingerprint at that default, so outputs written before keep theirs.
LATER_TASK_KEYS: dict[str, dict[str, Any]] = {
    "embed": {"dimensions": None, "quantize": None, "chunking": None},
    "zero-shot": {"image_column": "image"},
}


def _fingerprint_task(task: Any) -> dict[str, Any]:
    fields = task.model_dump(mode="json")
    for key, default in LATER_TASK_KEYS.get(fields.get("kind", ""), {}).items():
        if key in fields and fields[key] == default:
            fields.pop(key)
    return fields


def output_clash(task: Any,
                 passthrough: list[str]) -> str | None:
    """Why ``passthrough`` cannot sit beside the task's outputs (None: it can)."""
    clash = set(output_columns(task)) & set(passthrough)
    if clash:
        return f"passthrough column {sorted(clash)[0]!r} clashes with a task output"
    return None


def output_columns(task: Any) -> list[str]:
    """The columns a task writes (chunk rows: their chunk columns too)."""
    if isinstance(task, EmbedTaskSpec):
        chunks = ["chunk_index", "chunk_start", "chunk_end"] \
            if task.chunking is not None and task.chunking.pool == "none" else []
        return [*chunks, task.output_column]
    if isinstance(task, ClassifyTaskSpec | ZeroShotTaskSpec):
        cols = [task.label_column, task.score_column]
        return cols + ([task.probabilities_column] if task.probabilities_column else [])
    if isinstance(task, TokenClassifyTaskSpec | SparseEmbedTaskSpec | DetectTaskSpec):
        return [task.output_column]
    if isinstance(task, GenerateTaskSpec):
        return [task.output_column, *GENERATION_COLUMNS]
    return []


GENERATION_COLUMNS = ("finish_reason", "tokens_in", "tokens_out")

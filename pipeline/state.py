"""What the pipeline keeps on storage, as typed records with a format version.

    _pipeline/shards/<shard>.json   ShardMarker   a committed shard (the commit point)
    _pipeline/runs/<run>.json       RunManifest   one pass over the input (with its ledger)
    _pipeline/report.json           JobReport     totals, figures and failures of the last run
    _pipeline/job.json              JobDocument   the resolved spec, fingerprint and versions
    _pipeline/lease.json            LeaseRecord   the driver that holds the output now

Pydantic models, like the job file: reading a file validates it (a damaged one fails in one
line naming it), fills defaults for keys an older writer did not know, and keeps keys a newer
writer added (``extra="allow"``), so a driver and its workers may differ by a release.
Writers build these records; readers use attributes. ``record["key"]`` still reads a field,
so notebooks that index ``result.report["totals"]["rows_in"]`` keep working.

Versions: every record carries ``format_version`` (files written before the field existed
are version 2). A reader takes older versions through ``MIGRATIONS`` one step at a time and
refuses newer ones. ``FORMAT_VERSION`` is part of the job fingerprint, so a change that old
outputs cannot resume into bumps it; adding an optional field does not. The files written by
each version are kept as test cases (``tests/fixtures/state/v<N>``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from pipeline.errors import OutputError, one_line
from pipeline.plan import Shard

FORMAT_VERSION = 2  # 2: shards of pieces (split row groups, byte ranges, packed small files)
FIRST_VERSIONED = 2  # files without format_version were written by this version

# (record kind, version) -> a function that turns that version's document into the next one.
MIGRATIONS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}

Record = TypeVar("Record", bound="StateRecord")


class StateRecord(BaseModel):
    """Base of every stored record: tolerant of unknown keys, readable by key."""

    model_config = ConfigDict(extra="allow")

    # Read-only mapping access, for code that indexes the report like the dict it once was.
    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in type(self).model_fields
                                         or key in (self.model_extra or {}))

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return [*type(self).model_fields, *(self.model_extra or {})]

    def values(self) -> list[Any]:
        return [self[k] for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self.keys()]

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]  # keys, as a mapping's
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """The record as its JSON file holds it."""
        return self.model_dump(mode="json")

    @classmethod
    def read(cls: type[Record], data: Any, where: str) -> Record:
        """``data`` (a parsed JSON document) as this record; OutputError naming ``where``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            raise OutputError(f"{where}: not a valid {cls.__name__} ({key}: "
                              f"{one_line(err['msg'], 200)})") from exc


class VersionedRecord(StateRecord):
    """A record stored as a file of its own: it carries the format version it was written in."""

    KIND: ClassVar[str] = "record"  # its MIGRATIONS key
    format_version: int = FORMAT_VERSION

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        version = int(data.get("format_version", FIRST_VERSIONED))
        if version > FORMAT_VERSION:
            raise ValueError(f"written by format version {version}; this pipeline reads "
                             f"versions up to {FORMAT_VERSION} (upgrade it)")
        while version < FORMAT_VERSION:
            step = MIGRATIONS.get((cls.KIND, version))
            if step is None:
                raise ValueError(f"format version {version} cannot be read (no migration)")
            data, version = step(dict(data)), version + 1
        return {**data, "format_version": FORMAT_VERSION}


# Readers that test for a mapping (pandas.DataFrame of report rows, dict(record)) take one.
Mapping.register(StateRecord)


# ----------------------------------------------------------------------------- shard markers


class Timings(StateRecord):
    """Seconds one shard spent in each stage, summed over its windows."""

    read_s: float = Field(0.0, description="reading and decoding input")
    prepare_s: float = Field(0.0, description="tokenizing, stacking features")
    wait_s: float = Field(0.0, description="waiting for the session (another shard infers)")
    infer_s: float = Field(0.0, description="running the model")
    write_s: float = Field(0.0, description="writing the part file and dead letters")


class ShardMarker(VersionedRecord):
    """A committed shard: written last, after its part file and dead letters are in place."""

    KIND: ClassVar[str] = "marker"
    shard_id: str
    input: str  # the (first) input file, password redacted
    files: int = 1
    pieces: list[tuple[str, str, str, int, int]] = Field(default_factory=list)  # first 32
    rows_in: int
    rows_out: int
    rows_bad: int = 0
    bad_reasons: dict[str, int] = Field(default_factory=dict)
    # Rows scored with a caveat (texts cut at max_length...): note -> rows.
    row_notes: dict[str, int] = Field(default_factory=dict)
    attempt: int
    worker: str
    pool: str
    node_id: str | None = None
    node_ip: str | None = None
    provider: str
    fallback: str | None = None
    provider_after: str | None = None
    probes: int = 0
    batches: int = 0
    session: dict[str, Any] | None = None  # how the worker's session runs (tuning record)
    oom_splits: int = 0
    fingerprint: str = ""
    timings: Timings = Field(default_factory=Timings)
    peak_rss_mb: float = 0.0
    part: str = ""
    attempt_token: str = ""  # tells this attempt's marker from another's (markers since 611142c)
    committed_at: float = 0.0
    lance: dict[str, Any] | None = None  # Lance output: the fragments the shard wrote
    # A piece cut from a shard to isolate rows that kill workers (pipeline.isolation): its
    # rows of the root shard, the batch cap it ran with, or why its rows were dead-lettered.
    rows_range: tuple[int, int] | None = None
    batch_rows: int | None = None
    dead_letter: str | None = None


class Superseded(StateRecord):
    """An attempt that found its shard committed by another attempt."""

    attempt: int
    worker: str
    published: bool  # its files replaced the committed ones (object stores, a narrow race)


class ShardResult(StateRecord):
    """What a worker returns for a shard: the shard's marker on storage, and, when another
    attempt committed it first, this attempt's side."""

    marker: ShardMarker
    superseded: Superseded | None = None


# ----------------------------------------------------------------------------- run manifests


class FileList(StateRecord):
    count: int = 0
    first: list[str] = Field(default_factory=list)  # up to runs.LISTED_FILES


class InputDelta(StateRecord):
    new: FileList | None = None
    changed: FileList | None = None  # incremental runs only
    deleted: FileList | None = None
    unchanged: int | None = None

    @model_serializer(mode="wrap")
    def _only_known(self, handler: Any) -> dict[str, Any]:
        # A key is there only when its list is: readers test for "changed" to tell an
        # incremental run (as releases before typed state did).
        return {k: v for k, v in handler(self).items() if v is not None}


class ShardChanges(StateRecord):
    total: int = 0
    added: list[str] = Field(default_factory=list)
    kept: int = 0
    replaced: list[str] = Field(default_factory=list)
    retired: list[str] = Field(default_factory=list)


class SizingRecord(StateRecord):
    rows_per_shard: int
    asked_bytes_per_shard: int | None = None
    bytes_per_shard: dict[str, int] = Field(default_factory=dict)


class RunRows(StateRecord):
    total: int = 0
    added: int = 0
    removed: int = 0


RunStatus = Literal["running", "committing", "complete"]


class RunManifest(VersionedRecord):
    """One run: written ``running`` at its start, ``committing`` before the table commit and
    ``complete`` at its end. The ledger lists every shard the output holds after the run."""

    KIND: ClassVar[str] = "manifest"
    run: int
    status: RunStatus = "running"
    mode: str = "resume"
    format: str = "parquet"
    fingerprint: str = ""
    input_files: InputDelta = Field(default_factory=InputDelta)
    shards: ShardChanges = Field(default_factory=ShardChanges)
    ledger: list[Shard] = Field(default_factory=list)
    sizing: SizingRecord | None = None
    deleted_rows_not_kept: FileList | None = None
    rows: RunRows | None = None
    table: dict[str, Any] | None = None  # what the sink's commit_run returned, and format
    input_table: dict[str, Any] | None = None  # a table input: format, location, version read
    resumed: int = 0  # how often a crashed run was picked up again
    token: str | None = None  # this run's own id in table commits (merges), kept by resumes
    started_at: float = 0.0
    updated_at: float | None = None
    completed_at: float | None = None

    def public_view(self) -> RunView:
        """The manifest without its ledger: what the report and the summary show."""
        return RunView.model_validate(self.model_dump(exclude={"ledger"}))


class RunView(RunManifest):
    """A run manifest as the report shows it (no ledger)."""

    ledger: list[Shard] = Field(default_factory=list, exclude=True)


# ----------------------------------------------------------------------------- the report


class Totals(StateRecord):
    shards: int
    committed: int
    resumed: int
    run_now: int
    failed: int
    rows_in: int
    rows_out: int
    rows_bad: int
    rows_per_s: float | None = None
    first_shard_s: float | None = None  # start-up as users feel it: Ray, planning, model load
    input_bytes: int = 0


class BadRows(StateRecord):
    count: int
    fraction: float
    max_fraction: float
    budget_exceeded: bool
    by_reason: dict[str, int] = Field(default_factory=dict)


class RetriedShard(StateRecord):
    shard: str
    attempts: int
    errors: list[str] = Field(default_factory=list)  # one message per failed attempt
    error_types: list[str] = Field(default_factory=list)  # their types (DeviceError, ...)


class Attempts(StateRecord):
    total: int = 0
    retried_shards: list[RetriedShard] = Field(default_factory=list)
    actor_deaths: int = 0
    device_errors: int = 0
    errors_by_type: dict[str, int] = Field(default_factory=dict)  # failed attempts per error type


class Failure(StateRecord):
    shard: str
    input: str
    pieces: list[tuple[str, str, str, int, int]] = Field(default_factory=list)
    attempts: int
    last_error: str
    errors: list[str] = Field(default_factory=list)
    error_types: list[str] = Field(default_factory=list)


class PoolFigures(StateRecord):
    shards: int = 0
    rows: int = 0
    infer_s: float = 0.0
    rows_per_infer_s: float | None = None


class WorkerFigures(StateRecord):
    id: str | None = None  # the runner's name for the actor (cpu-1); None if it never answered
    pool: str | None = None
    worker: str | None = None  # pool@host:pid
    provider: str | None = None
    fallback: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    session: dict[str, Any] | None = None
    memory_mb: float | None = None  # what the worker's process could use: cgroup or machine
    shards: int = 0
    rows: int = 0
    read_s: float = 0.0
    infer_s: float = 0.0
    write_s: float = 0.0


class NodeFigures(StateRecord):
    node_id: str
    node_ip: str | None = None
    workers: int = 0
    shards: int = 0
    rows: int = 0
    infer_s: float = 0.0
    rows_per_infer_s: float | None = None


class TimelinePoint(StateRecord):
    t: float  # seconds since the run started
    rows: int  # rows committed so far
    shard: str
    node_id: str | None = None


class Startup(StateRecord):
    plan_s: float = 0.0
    pack_s: float = 0.0
    ray_s: float = 0.0
    first_worker_ready_s: float | None = None
    first_shard_s: float | None = None


class OfJob(VersionedRecord):
    """A record about one job's output: the job's fingerprint and model."""

    fingerprint: str
    model_sha256: str
    bundle_identity: str


class IsolatedRow(StateRecord):
    shard: str  # the one-row piece, <root>-r<row>-<row+1>of<rows>
    reason: str
    committed: bool = False  # its dead letter is written


class Isolated(StateRecord):
    """Shards cut because rows killed their workers or ran them out of memory."""

    shards: int = 0  # shards cut
    pieces: int = 0  # pieces they were cut into
    rows: list[IsolatedRow] = Field(default_factory=list)  # single rows dead-lettered


class JobReport(OfJob):
    """``_pipeline/report.json``: the output as of the last run."""

    KIND: ClassVar[str] = "report"
    job: str
    output: str
    status: Literal["succeeded", "failed"]
    exit_code: int
    started_at: float
    finished_at: float
    wall_s: float
    totals: Totals
    bad_rows: BadRows
    attempts: Attempts
    failures: list[Failure] = Field(default_factory=list)
    aborted: str | None = None
    pools: dict[str, PoolFigures] = Field(default_factory=dict)
    workers: list[WorkerFigures] = Field(default_factory=list)
    nodes: list[NodeFigures] = Field(default_factory=list)
    timeline: list[TimelinePoint] = Field(default_factory=list)
    providers: dict[str, int] = Field(default_factory=dict)
    fallbacks: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    # Rows scored with a caveat, summed over the output's shards (texts cut at max_length...).
    row_notes: dict[str, int] = Field(default_factory=dict)
    startup: Startup | None = None
    run: RunView | None = None
    isolation: Isolated | None = None


class JobDocument(OfJob):
    """``_pipeline/job.json``: the resolved spec (secrets redacted), fingerprint, versions."""

    KIND: ClassVar[str] = "job"
    name: str
    spec: dict[str, Any]
    shards: int
    files: int
    rows: int | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    input_table: dict[str, Any] | None = None  # a table input: format, location, version read
    written_at: float

    @property
    def output_format(self) -> str:
        return (self.spec.get("output") or {}).get("format", "parquet")


# ----------------------------------------------------------------------------- the lease


class LeaseRecord(VersionedRecord):
    """``_pipeline/lease.json``: the one driver that may write this output now, renewed by its
    heartbeat (``pipeline.lease``)."""

    KIND: ClassVar[str] = "lease"
    token: str  # this holding: a driver knows its own lease by it
    host: str
    pid: int
    pid_started: float | None = None  # the process's start (Linux): tells a reused pid apart
    process_space: str | None = None  # boot id and pid namespace: who can see that pid
    job: str
    ray_job_id: str | None = None  # known once the driver joined Ray
    started_at: float
    renewed_at: float
    timeout_s: float  # a lease not renewed for this long is taken over
    took_over: str | None = None  # the holder this one replaced, in words

    def describe(self, now: float) -> str:
        ray_job = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return (f"host {self.host} pid {self.pid} (job {self.job}{ray_job}), last renewed "
                f"{max(0.0, now - self.renewed_at):.0f} s ago")

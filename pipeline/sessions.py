"""ONNX Runtime sessions: provider selection, honest fallback reporting, per-owner caching.

onnxruntime-gpu lists CUDA and TensorRT even where their libraries cannot load, so the
providers a session really runs on are read back with ``get_providers()`` after creation.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from pipeline.errors import one_line
from pipeline.genai_sessions import GenaiSession, genai_provider, require_genai

log = logging.getLogger(__name__)
# onnxruntime logs every failed provider library load at error level straight to stderr;
# we report fallbacks ourselves, once, in one line.
ort.set_default_logger_severity(4)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
SHORT_NAMES = {v: k for k, v in PROVIDER_NAMES.items()}


@dataclass(frozen=True)
class SessionSettings:
    providers: tuple[str, ...] = ("cpu",)  # short names, in order of preference
    provider_options: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    intra_op_threads: int = 0  # 0: let onnxruntime pick
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    # Session config entries (onnxruntime's add_session_config_entry), e.g. spinning.
    config: tuple[tuple[str, str], ...] = ()
    # Where a CPU session keeps its optimized graph for the next process on this node; None:
    # optimize in memory every time.
    optimized_cache_dir: str | None = None


@dataclass
class LoadedSession:
    session: ort.InferenceSession
    requested: tuple[str, ...]
    active: str  # short name of the provider that runs the graph
    fallback: str | None = None  # why the first requested provider is not the one running
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    # Set by inference when the session stops being trustworthy (see pipeline.inference):
    fallback_mid_job: str | None = None  # the provider changed after creation: from, to, why
    broken: str | None = None  # why the session must not run again (a DeviceError's message)
    # One row of model inputs this session has run without error: the health probe.
    probe_feeds: dict[str, Any] | None = field(default=None, repr=False)
    # How the session was set up, for markers and the report (see ``tuning_record``).
    tuning: dict[str, Any] = field(default_factory=dict)
    # The GPU a CUDA or TensorRT session runs on: its runs go through an IOBinding
    # (pipeline.providers.run_bound) that copies back only the outputs asked for.
    gpu_device_id: int | None = None


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@functools.cache
def _preload_gpu_libraries() -> None:
    """Load CUDA and cuDNN installed from the package index (onnxruntime-gpu[cuda,cudnn]),
    which the dynamic loader would not find on its own. Once per process."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:  # it prints each library it misses; the provider check reports the fallback instead
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:
        log.debug("onnxruntime.preload_dlls failed: %s", exc)
    if printed.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", one_line(printed.getvalue()))


def create_session(model: str | bytes, settings: SessionSettings,
                   model_sha256: str | None = None) -> LoadedSession:
    """A session for ``model``; ``model_sha256`` (of a path) lets a CPU session reuse the graph
    an earlier process on this node optimized (``settings.optimized_cache_dir``)."""
    started = time.perf_counter()
    if {"cuda", "tensorrt"} & set(settings.providers):
        _preload_gpu_libraries()
    available = set(ort.get_available_providers())
    chain = _provider_chain(settings, available)
    cache = OptimizedGraphCache.for_session(model, settings, model_sha256, chain)
    opts = _session_options(settings)
    source = model
    if cache is not None:
        source = cache.prepare(opts) or model
    printed = io.StringIO()
    # onnxruntime prints its own provider fallback banner; keep it for our message instead.
    with contextlib.redirect_stdout(printed):
        try:
            session = ort.InferenceSession(source, sess_options=opts,
                                           providers=[p for p, _ in chain],
                                           provider_options=[o for _, o in chain])
        except Exception:
            if source is model:
                raise
            # A saved graph that no longer loads (a damaged disk, a swapped library): drop it
            # and start from the model.
            cache.discard()
            return create_session(model, settings, model_sha256)
    graph = cache.finish() if cache is not None else "optimized in memory"
    active = SHORT_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    fallback = _fallback(settings, active, available, printed.getvalue())
    return LoadedSession(
        session=session,
        requested=settings.providers,
        active=active,
        fallback=fallback,
        input_names=[i.name for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
        tuning=tuning_record(session, settings, graph, time.perf_counter() - started),
        gpu_device_id=_gpu_device_id(session) if active in ("cuda", "tensorrt") else None,
    )


def create_genai_session(folder: str, settings: SessionSettings) -> LoadedSession:
    """An onnxruntime-genai model folder as a session (``pipeline.genai_sessions``)."""
    require_genai("model.uri")
    started = time.perf_counter()
    active, fallback = genai_provider(settings.providers)
    session = GenaiSession(folder, active, settings.intra_op_threads)
    return LoadedSession(session=session, requested=settings.providers, active=active,
                         fallback=fallback,
                         tuning={"runtime": "onnxruntime-genai", "provider": active,
                                 "intra_op_threads": settings.intra_op_threads,
                                 "load_s": round(time.perf_counter() - started, 3)})


def _provider_chain(settings: SessionSettings,
                    available: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The providers asked for that this build has, with their options; CPU always last."""
    options = dict(settings.provider_options)
    chain = [(PROVIDER_NAMES[short], dict(options.get(short, ())))
             for short in settings.providers if PROVIDER_NAMES[short] in available]
    if not any(p == "CPUExecutionProvider" for p, _ in chain):
        chain.append(("CPUExecutionProvider", {}))
    return chain


def _session_options(settings: SessionSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.log_severity_level = 4  # our errors say what failed, in one line; no C++ log spam
    for key, value in settings.config:
        opts.add_session_config_entry(key, value)
    return opts


def _fallback(settings: SessionSettings, active: str, available: set[str],
              printed: str) -> str | None:
    """Why the first provider asked for is not the one that runs (None: it is)."""
    if active == settings.providers[0]:
        return None
    wanted = PROVIDER_NAMES[settings.providers[0]]
    why = "not in this onnxruntime build" if wanted not in available else "failed to load"
    detail = _ep_error(printed)
    fallback = f"{settings.providers[0]} {why}; running on {active}" + (
        f" ({detail})" if detail else "")
    log.warning("provider fallback: %s", fallback)
    return fallback


def _gpu_device_id(session: ort.InferenceSession) -> int:
    options = session.get_provider_options().get(session.get_providers()[0], {})
    try:
        return int(options.get("device_id", 0))
    except ValueError:
        return 0


def tuning_record(session: ort.InferenceSession, settings: SessionSettings, graph: str,
                  create_s: float) -> dict[str, Any]:
    """What the session runs with, read back where onnxruntime can say (providers, options)."""
    running = session.get_providers()
    applied = session.get_provider_options()
    record: dict[str, Any] = {
        "providers": [SHORT_NAMES.get(p, p) for p in running],
        "intra_op_threads": settings.intra_op_threads or "onnxruntime default",
        "graph": graph,
        "create_s": round(create_s, 3),
        **{k.removeprefix("session."): v for k, v in settings.config},
    }
    for full in running[:1]:
        if full != "CPUExecutionProvider":  # the GPU provider's options as it reports them
            asked = dict(dict(settings.provider_options).get(SHORT_NAMES.get(full, full), ()))
            record["provider_options"] = {k: v for k, v in applied.get(full, {}).items()
                                          if k in asked or k in _REPORTED_OPTIONS}
    return record


# Provider options worth a line in the report even where the job did not set them.
_REPORTED_OPTIONS = ("device_id", "trt_fp16_enable", "trt_engine_cache_enable",
                     "trt_engine_cache_path", "trt_timing_cache_enable", "trt_profile_min_shapes",
                     "trt_profile_opt_shapes", "trt_profile_max_shapes")


class OptimizedGraphCache:
    """The CPU provider's optimized graph, saved once per node and loaded by later sessions.

    Optimizing a transformer graph (fusions, layout) takes a good part of session creation, and
    every worker process on a node repeats it. The saved graph is only valid for the same model,
    onnxruntime version, provider, optimization level and CPU (layout transforms depend on the
    instruction set), so all of those make up its name. It is written under a temporary name
    and renamed, so a concurrent process sees a whole file or none.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saving: Path | None = None

    @classmethod
    def for_session(cls, model: str | bytes, settings: SessionSettings, sha256: str | None,
                    chain: list[tuple[str, dict[str, Any]]]) -> OptimizedGraphCache | None:
        if (settings.optimized_cache_dir is None or sha256 is None or not isinstance(model, str)
                or [p for p, _ in chain] != ["CPUExecutionProvider"]
                or settings.graph_optimization == "disable"
                or os.path.getsize(model) > _LARGEST_CACHED_MODEL):
            return None
        key = "-".join([sha256[:32], f"ort{ort.__version__}", "cpu", settings.graph_optimization,
                        _cpu_signature()])
        return cls(Path(settings.optimized_cache_dir) / "optimized" / f"{key}.onnx")

    def prepare(self, opts: ort.SessionOptions) -> str | None:
        """The saved graph's path to load instead of the model, or None (then save it)."""
        if self.path.is_file():
            # Already optimized for this machine: optimizing again would only cost time.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only cache: optimize in memory as before
            log.debug("optimized graph cache unavailable: %s", exc)
            return None
        self._saving = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        opts.optimized_model_filepath = str(self._saving)
        return None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def finish(self) -> str:
        if self._saving is None:
            return "loaded from the node cache"
        try:
            os.replace(self._saving, self.path)
        except OSError as exc:
            log.debug("could not keep the optimized graph: %s", exc)
            return "optimized in memory"
        return "optimized and saved to the node cache"


# Past protobuf's 2 GB limit the saved graph would need external data files; such models are
# optimized in memory every time.
_LARGEST_CACHED_MODEL = 1 << 30


@functools.cache
def _cpu_signature() -> str:
    """A short digest of this CPU's model and instruction-set flags."""
    fields = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    fields.append(line.split(":", 1)[1].strip())
                if len(fields) >= 3:
                    break
    except OSError:
        fields.append(platform.processor())
    return hashlib.sha256("|".join(fields).encode()).hexdigest()[:12]


def running_provider(session: Any) -> str | None:
    """Short name of the provider that runs ``session`` now, read back; None if it cannot say."""
    get = getattr(session, "get_providers", None)
    if get is None:
        return None
    try:
        full = get()[0]
    except Exception:  # a wrapper or a torn-down session: no evidence either way
        return None
    return SHORT_NAMES.get(full, full)


def _ep_error(banner: str) -> str:
    """The human part of onnxruntime's fallback banner, without the C++ source location."""
    match = re.search(r"EP Error (/.*?) when using", banner, re.S)
    if not match:
        return ""
    text = " ".join(match.group(1).split())
    text = re.sub(r"^\S+:\d+ [^()]*\([^)]*\)\s*", "", text)
    return text[:160]


class SessionCache:
    """Sessions owned by one worker, keyed by (model sha256, settings)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, SessionSettings, str], LoadedSession] = {}

    def get(self, model_path: str, sha256: str, settings: SessionSettings,
            runtime: str = "onnx") -> LoadedSession:
        """``runtime`` ``genai``: the model's folder loaded by onnxruntime-genai instead."""
        key = (sha256, settings, runtime)
        if key not in self._sessions:
            self._sessions[key] = create_genai_session(str(Path(model_path).parent), settings) \
                if runtime == "genai" else create_session(model_path, settings, sha256)
        return self._sessions[key]

    def clear(self) -> None:
        self._sessions.clear()


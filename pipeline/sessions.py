"""ONNX Runtime sessions: provider selection, honest fallback reporting, per-owner caching.

onnxruntime-gpu lists CUDA and TensorRT even where their libraries cannot load, so the
providers a session really runs on are read back with ``get_providers()`` after creation.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

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
        log.debug("onnxruntime.preload_dlls: %s", " ".join(printed.getvalue().split())[:300])


def create_session(model: str | bytes, settings: SessionSettings) -> LoadedSession:
    if {"cuda", "tensorrt"} & set(settings.providers):
        _preload_gpu_libraries()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _OPT_LEVELS[settings.graph_optimization]
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.log_severity_level = 4  # our errors say what failed, in one line; no C++ log spam
    available = set(ort.get_available_providers())
    options = dict(settings.provider_options)
    chain: list[tuple[str, dict[str, Any]]] = []
    for short in settings.providers:
        full = PROVIDER_NAMES[short]
        if full in available:
            chain.append((full, dict(options.get(short, ()))))
    if not any(p == "CPUExecutionProvider" for p, _ in chain):
        chain.append(("CPUExecutionProvider", {}))
    printed = io.StringIO()
    # onnxruntime prints its own provider fallback banner; keep it for our message instead.
    with contextlib.redirect_stdout(printed):
        session = ort.InferenceSession(
            model,
            sess_options=opts,
            providers=[p for p, _ in chain],
            provider_options=[o for _, o in chain],
        )
    active = SHORT_NAMES.get(session.get_providers()[0], session.get_providers()[0])
    fallback = None
    if active != settings.providers[0]:
        wanted = PROVIDER_NAMES[settings.providers[0]]
        why = "not in this onnxruntime build" if wanted not in available else "failed to load"
        detail = _ep_error(printed.getvalue())
        fallback = f"{settings.providers[0]} {why}; running on {active}" + (
            f" ({detail})" if detail else "")
        log.warning("provider fallback: %s", fallback)
    return LoadedSession(
        session=session,
        requested=settings.providers,
        active=active,
        fallback=fallback,
        input_names=[i.name for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
    )


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
        self._sessions: dict[tuple[str, SessionSettings], LoadedSession] = {}

    def get(self, model_path: str, sha256: str, settings: SessionSettings) -> LoadedSession:
        key = (sha256, settings)
        if key not in self._sessions:
            self._sessions[key] = create_session(model_path, settings)
        return self._sessions[key]

    def clear(self) -> None:
        self._sessions.clear()


"""GPU execution providers: which device, which options, which session config, bound runs.

Plain functions, testable without a GPU or Ray; ``pipeline.sessions`` and ``pipeline.worker``
call them. Option names are the ones onnxruntime 1.31 parses (checked against the strings in
``libonnxruntime_providers_cuda.so`` / ``libonnxruntime_providers_tensorrt.so`` of
onnxruntime-gpu 1.31.1, and against ``cuda_execution_provider_info.cc``); values go to
onnxruntime as strings, booleans as "1"/"0" (the CUDA EP parses some flags as ints, which
"True" would fail: ``TryParseStringWithClassicLocale`` in ``core/common/parse_string.h``).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.bundle import default_cache_dir

GPU_PROVIDERS = frozenset({"cuda", "tensorrt"})
TEXT_ROLES = ("tokens.ids", "tokens.attention_mask", "tokens.type_ids")

CUDA_OPTION_NAMES = frozenset({
    "device_id", "has_user_compute_stream", "user_compute_stream", "gpu_mem_limit",
    "arena_extend_strategy", "cudnn_conv_algo_search", "do_copy_in_default_stream",
    "gpu_external_alloc", "gpu_external_free", "gpu_external_empty_cache",
    "cudnn_conv_use_max_workspace", "enable_cuda_graph", "cudnn_conv1d_pad_to_nc1d",
    "tunable_op_enable", "tunable_op_tuning_enable", "tunable_op_max_tuning_duration_ms",
    "enable_skip_layer_norm_strict_mode", "prefer_nhwc", "use_ep_level_unified_stream",
    "use_tf32", "sdpa_kernel", "fuse_conv_bias",
})
TENSORRT_OPTION_NAMES = frozenset({"device_id", "user_compute_stream", "has_user_compute_stream"} | {
    "trt_" + n for n in (
        "auxiliary_streams", "bf16_enable", "build_heuristics_enable", "builder_optimization_level",
        "context_memory_sharing_enable", "cuda_graph_enable", "detailed_build_log", "dla_core",
        "dla_enable", "dump_ep_context_model", "dump_subgraphs", "engine_cache_enable",
        "engine_cache_path", "engine_cache_prefix", "engine_decryption_enable",
        "engine_decryption_lib_path", "engine_hw_compatible", "ep_context_embed_mode",
        "ep_context_file_path", "extra_plugin_lib_paths", "force_sequential_engine_build",
        "force_timing_cache", "fp16_enable", "int8_calibration_table_name", "int8_enable",
        "int8_use_native_calibration_table", "layer_norm_fp32_fallback", "load_user_initializer",
        "max_partition_iterations", "max_workspace_size", "min_subgraph_size",
        "onnx_model_folder_path", "op_types_to_exclude", "preview_features",
        "profile_max_shapes", "profile_min_shapes", "profile_opt_shapes", "sparsity_enable",
        "tactic_sources", "timing_cache_enable", "timing_cache_path",
        "weight_stripped_engine_enable")})
KNOWN_OPTIONS = {"cuda": CUDA_OPTION_NAMES, "tensorrt": TENSORRT_OPTION_NAMES}
_SHORT_NAMES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                "TensorrtExecutionProvider": "tensorrt"}  # as pipeline.sessions names them


# -- which GPU ------------------------------------------------------------------------------

def assigned_gpu_device_id(environ: Mapping[str, str] | None = None,
                           ray_gpu_ids: Sequence[int | str] | None = None) -> int:
    """The CUDA device index (within this process's visible devices) of the GPU Ray assigned.

    Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs, so its first GPU is device 0. Where it
    does not (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), CUDA numbers the devices that the
    environment shows: unset means all of them (the Ray id is the device index), a list means
    the Ray id's position in it. Anything unclear gives 0: a wrong device shows up as the
    provider fallback that sessions report, never as an exception here.
    """
    env = os.environ if environ is None else environ
    ids = _ray_gpu_ids() if ray_gpu_ids is None else list(ray_gpu_ids)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if not ids:
        return 0
    first = str(ids[0]).strip()
    if visible is None:
        return int(first) if first.isdigit() else 0
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return entries.index(first) if first in entries else 0


def _ray_gpu_ids() -> list[int | str]:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # outside a Ray worker, or an older Ray: no assignment to honour
        return []


def gpu_name(device_id: int, environ: Mapping[str, str] | None = None,
             timeout_s: float = 5.0) -> str | None:
    """The GPU's name from nvidia-smi, or None. nvidia-smi ignores CUDA_VISIBLE_DEVICES, so
    the device index is mapped through it to the physical index or UUID first."""
    env = os.environ if environ is None else environ
    entries = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    target = entries[device_id] if device_id < len(entries) else str(device_id)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                              "-i", target], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return (lines[0].strip() or None) if lines else None


# -- provider options -----------------------------------------------------------------------

def option_strings(provider: str, options: Mapping[str, Any] | None) -> dict[str, str]:
    """``options`` as onnxruntime takes them; an unknown name is a ValueError naming the
    valid ones (onnxruntime would only fail at session creation, or fall back)."""
    out: dict[str, str] = {}
    known = KNOWN_OPTIONS.get(provider)
    for key, value in (options or {}).items():
        if known is not None and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"valid: {', '.join(sorted(known))}"
            raise ValueError(f"providers.options.{provider}.{key}: unknown {provider} option; {hint}")
        out[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


def cuda_options(device_id: int, user: Mapping[str, Any] | None = None) -> dict[str, str]:
    """CUDA EP options for batch inference; the job's ``providers.options.cuda`` win.

    - arena_extend_strategy kSameAsRequested: batches change shape all the time; growing the
      arena to the next power of two each time strands memory that other actors on the same
      GPU need.
    - cudnn_conv_algo_search HEURISTIC: the default EXHAUSTIVE benchmarks every convolution
      again for every new input shape (ours vary batch by batch); only convolutions care.
    - do_copy_in_default_stream 1: the default, stated: copies and compute on one stream
      (0 can race, onnxruntime issue #4829).
    use_tf32 stays at onnxruntime's default (on): float32 MatMuls on tensor cores, about 1e-3
    relative difference from the CPU; set ``use_tf32: 0`` where that matters.
    """
    ours = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
    return {**ours, **option_strings("cuda", user)}


def tensorrt_cache_dir(root: str | Path, model_sha256: str, gpu: str | None,
                       ort_version: str | None = None) -> Path:
    """Node-local directory for one model's engines and timing cache: engines are valid for
    one model, one onnxruntime (and so TensorRT) build and one GPU model only."""
    if ort_version is None:
        import onnxruntime

        ort_version = onnxruntime.__version__
    gpu_part = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-") if gpu else "unknown-gpu"
    return Path(root) / "tensorrt" / f"{model_sha256[:16]}-ort{ort_version}-{gpu_part}"


def tensorrt_options(device_id: int, cache_dir: str | Path,
                     input_names_and_roles: Mapping[str, str], max_rows: int, max_tokens: int,
                     max_length: int | None, user: Mapping[str, Any] | None = None,
                     input_shapes: Mapping[str, Sequence[int | None]] | None = None,
                     ) -> dict[str, str]:
    """TensorRT EP options: FP16, engine and timing caches under ``cache_dir`` and explicit
    optimization profiles from the batching settings; the job's ``providers.options.tensorrt``
    win. ``input_shapes`` (``graph_input_shapes``) gives static dims; without it text inputs are
    taken as [batch, seq] and other inputs get no explicit profile.

    Engines go to ``cache_dir/engines-<digest of the options that shape an engine>``: another
    batching setting builds into its own folder instead of rebuilding over the other's.
    The caller creates the folders first (``make_cache_dirs``), once per node under a lock:
    actors that build the same engine at once would write the same files.
    """
    cache_dir = Path(cache_dir)
    ours = {"device_id": str(device_id), "trt_fp16_enable": "1",
            "trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache_dir / "timing")}
    ours.update(profile_shapes(input_names_and_roles, input_shapes or {}, max_rows, max_tokens,
                               max_length))
    options = {**ours, **option_strings("tensorrt", user)}
    if "trt_engine_cache_path" not in options:
        shaping = sorted((k, v) for k, v in options.items()
                         if k.startswith("trt_") and not k.endswith("_path"))
        digest = hashlib.sha256(repr(shaping).encode()).hexdigest()[:12]
        options["trt_engine_cache_path"] = str(cache_dir / f"engines-{digest}")
    return options


def make_cache_dirs(options: Mapping[str, str]) -> None:
    for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)


def profile_shapes(roles: Mapping[str, str], shapes: Mapping[str, Sequence[int | None]],
                   max_rows: int, max_tokens: int, max_length: int | None) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes ("name:1x1,name2:1x1", trtexec's format; onnxruntime
    PR #15546), or {} when some input's dynamic dims are unknown (a partial profile is an
    error; without one the EP builds for the shapes it sees and rebuilds on larger ones).

    Text inputs are [batch, seq]. The batcher keeps rows x longest <= max_tokens, but a
    profile is a box, so it must hold both corners: max_rows short rows and one row of
    max_length tokens; max is rows x max_length with rows = min(max_rows, max_tokens).
    Opt is a full batch at the knee where both limits bind: seq = max_tokens // max_rows.
    Other inputs are [batch, static dims...]: 1 row to max_rows, opt a full batch.
    """
    if not roles:
        return {}
    text_rows = max(1, min(max_rows, max_tokens))
    knee = max(1, min(max_length or 1, max_tokens // text_rows))
    min_s, opt_s, max_s = [], [], []
    for name, role in roles.items():
        shape = list(shapes.get(name) or ([None, None] if role in TEXT_ROLES else []))
        if not shape:
            return {}
        if role in TEXT_ROLES:
            if len(shape) != 2 or (shape[1] is None and not max_length):
                return {}
            seq = shape[1]
            lo = [1, seq or 1]
            opt = [max(1, min(text_rows, max_tokens // (seq or knee))), seq or knee]
            hi = [text_rows, seq or max_length]
        else:
            if any(d is None for d in shape[1:]):
                return {}
            rest = [int(d) for d in shape[1:]]
            lo, opt, hi = [1, *rest], [max_rows, *rest], [max_rows, *rest]
        if shape[0] is not None:  # a static batch: the profile cannot move it
            lo[0] = opt[0] = hi[0] = int(shape[0])
        min_s.append(f"{name}:{_dims(lo)}")
        opt_s.append(f"{name}:{_dims(opt)}")
        max_s.append(f"{name}:{_dims(hi)}")
    return {"trt_profile_min_shapes": ",".join(min_s), "trt_profile_opt_shapes": ",".join(opt_s),
            "trt_profile_max_shapes": ",".join(max_s)}


def _dims(dims: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in dims)


def graph_input_shapes(model_path: str | Path) -> dict[str, tuple[int | None, ...]]:
    """Graph inputs and their dims (None where dynamic), read from the ONNX file without its
    weights or a session; initializers listed as inputs (old exporters) are left out."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in i.type.tensor_type.shape.dim)
            for i in graph.input if i.name not in weights}


@dataclass(frozen=True)
class TensorrtContext:
    """What tensorrt_options needs beyond the device: the cache and the batching settings."""

    cache_dir: Path
    roles: Mapping[str, str]  # graph input name -> bundle source (tokens.ids, features, ...)
    shapes: Mapping[str, Sequence[int | None]]  # graph_input_shapes(model)
    max_rows: int
    max_tokens: int
    max_length: int | None


def provider_options(providers: Sequence[str], user: Mapping[str, Mapping[str, Any]],
                     device_id: int = 0, tensorrt: TensorrtContext | None = None,
                     ) -> dict[str, dict[str, str]]:
    """Options for each provider of a chain (short names): cuda and tensorrt tuned as above,
    others (cpu) the job's own, as strings."""
    out: dict[str, dict[str, str]] = {}
    for short in providers:
        if short == "cuda":
            out[short] = cuda_options(device_id, user.get("cuda"))
        elif short == "tensorrt":
            t = tensorrt or _no_profiles()
            out[short] = tensorrt_options(device_id, t.cache_dir, t.roles, t.max_rows,
                                          t.max_tokens, t.max_length, user.get("tensorrt"),
                                          t.shapes)
        else:
            out[short] = option_strings(short, user.get(short))
    return out


def _no_profiles() -> TensorrtContext:
    """Caches in the node's cache folder, no explicit profiles: for callers without a bundle."""
    return TensorrtContext(default_cache_dir() / "tensorrt" / "shared", {}, {}, 1, 1, None)


# -- session config -------------------------------------------------------------------------

def session_config(providers: Sequence[str], strict: bool = False) -> dict[str, str]:
    """Session config entries (``SessionOptions.add_session_config_entry``) for a chain.

    - session.intra_op.allow_spinning: "1" for CPU sessions (workers spin between the ops of
      a batch: lower latency, and the cores are the actor's anyway); "0" when a GPU runs the
      graph: the intra-op threads run only the few CPU nodes, and spinning would burn the
      cores that tokenization and Arrow I/O need.
    - session.record_ep_graph_assignment_info "1" for GPU chains, so ``node_placement`` can
      say which nodes the GPU left to the CPU.
    - session.disable_cpu_ep_fallback "1" only with ``strict``. In onnxruntime 1.31 the
      session then fails to initialize when any node is left to the CPU EP: a CUDA EP that
      could not load (everything on the CPU), a node without a CUDA kernel, and also the small
      shape nodes the CUDA EP leaves to the CPU on purpose (``GetCpuPreferredNodes``). With
      "cpu" in the chain it is always refused ("Conflicting session configuration",
      INVALID_ARGUMENT; both checks in ``InferenceSession::Initialize``), so strict needs a
      chain without cpu, and InferenceSession(..., enable_fallback=0) so that the Python
      retry on CPU does not hide the first error behind that conflict.
    """
    gpu = bool(providers) and providers[0] in GPU_PROVIDERS
    config = {"session.intra_op.allow_spinning": "0" if gpu else "1"}
    if gpu:
        config["session.record_ep_graph_assignment_info"] = "1"
    if strict:
        if not gpu:
            raise ValueError(f"strict GPU placement needs a GPU provider first, got {list(providers)}")
        if "cpu" in providers:
            raise ValueError("strict GPU placement cannot list cpu: onnxruntime refuses "
                             "session.disable_cpu_ep_fallback with the CPU EP in the chain")
        config["session.disable_cpu_ep_fallback"] = "1"
    return config


def node_placement(session: Any) -> dict[str, Counter[str]]:
    """Op types per provider (short names) as the session placed them; {} unless the session
    was created with session.record_ep_graph_assignment_info (see ``session_config``)."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # not recorded, or an onnxruntime without the call
        return {}
    placed: dict[str, Counter[str]] = {}
    for sub in subgraphs:
        ops = placed.setdefault(_SHORT_NAMES.get(sub.ep_name, sub.ep_name), Counter())
        ops.update(node.op_type for node in sub.get_nodes())
    return placed


def placement_summary(placed: Mapping[str, Mapping[str, int]]) -> str:
    """One line: "cuda 310 nodes, cpu 12 (Shape 4, Gather 3, ...)"."""
    parts = []
    for provider, ops in sorted(placed.items(), key=lambda kv: kv[0] == "cpu"):
        text = f"{provider} {sum(ops.values())} nodes"
        if provider == "cpu" and len(placed) > 1:
            text += " (" + ", ".join(f"{op} {n}" for op, n in Counter(ops).most_common(6)) + ")"
        parts.append(text)
    return ", ".join(parts)


# -- bound runs -----------------------------------------------------------------------------

def run_bound(session: Any, output_names: Sequence[str], feeds: Mapping[str, np.ndarray],
              device: str = "cpu", device_id: int = 0) -> list[np.ndarray]:
    """``session.run(output_names, feeds)`` through an IOBinding.

    Inputs are bound from host memory (onnxruntime copies them to the device inside the run,
    as session.run does); only the requested outputs are bound, on the session's device
    (``device``: "cpu" or "cuda"), left for onnxruntime to allocate there (shapes vary batch
    by batch), and copied to host arrays once the run is over. That is one host-to-device copy
    per input and one device-to-host copy per requested output, and no output the caller
    did not ask for is ever copied back.
    """
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for name in output_names:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding)
    return list(binding.copy_outputs_to_cpu())

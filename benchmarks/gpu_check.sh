#!/usr/bin/env bash
# Does onnxruntime really run on the GPU here, and how fast is the pipeline there? For a machine
# WITH an NVIDIA GPU; not part of `make test`. Steps:
#   0. (only with GPU_CARRY=1, on the lent machine: benchmarks/GPU.md) reassemble the carried
#      parts gpu_carry/part-NN, install their wheels offline into $PYTHON (default python3;
#      onnxruntime-gpu replaces a CPU onnxruntime) and put models/minilm in place;
#   1. nvidia-smi: the GPU and driver;
#   2. onnxruntime.preload_dlls(), then the providers an InferenceSession of the model really got
#      (get_providers() after creation: listing CUDA in get_available_providers() is not enough,
#      onnxruntime quietly falls back to the CPU when CUDA, cuDNN, the driver or the GPU are
#      missing), where its nodes went, whether a strict session (session.disable_cpu_ep_fallback)
#      is accepted, whether TensorRT can load, and the latency of a 64 x 128 batch.
#      Exits 1 unless CUDAExecutionProvider is the first provider;
#   3. python -m benchmarks.gpu_bench (raw CUDA loop, pipeline.score, a Ray job), time-boxed;
#   4. TensorRT through gpu_bench, if libnvinfer loads and time is left.
# The last line, "GPU_CHECK {...}", holds every figure; with $OUT set it is also $OUT/gpu_check.json.
#
#   make models && bash benchmarks/gpu_check.sh      # the project's .venv (created if missing)
#   PYTHON=python bash benchmarks/gpu_check.sh       # another interpreter, e.g. in the image:
#   docker run --rm --gpus all -e PYTHON=python -v "$PWD/models:/home/ray/pipeline/models:ro" \
#     ghcr.io/example/onnx-ray-pipeline:latest bash benchmarks/gpu_check.sh
#   MODEL=path/to/model.onnx RUNS=50 ROWS=20000 BUDGET_S=300 bash benchmarks/gpu_check.sh
#   PROVIDER=cpu ROWS=200 RAW_S=2 RAY_CPUS=1 bash benchmarks/gpu_check.sh   # a dry run, no GPU
#
# Needs an NVIDIA driver for the CUDA major of onnxruntime-gpu (CUDA 13: driver >= 580) and the
# project's `cuda` extra (the CUDA runtime and cuDNN wheels; infra/Dockerfile installs it), or an
# image whose PyTorch brought the same CUDA 13 and cuDNN 9 wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

MODEL=${MODEL:-models/minilm/model.onnx}
RUNS=${RUNS:-10}
ROWS=${ROWS:-50000}
BUDGET_S=${BUDGET_S:-300}  # the whole script, install included; the bench parts shrink to fit
PROVIDER=${PROVIDER:-cuda}  # cpu: a dry run of the whole script where no GPU is (no exit 1)
RAY_CPUS=${RAY_CPUS:-4}     # CPUs of the one Ray actor of the pipeline run
RESULT=${TMPDIR:-/tmp}/gpu_check.json
rm -f "$RESULT"
left() { echo $((BUDGET_S - SECONDS)); }

if [[ ${GPU_CARRY:-0} == 1 ]]; then  # changes $PYTHON's packages: for the lent machine only
    echo "== carried parts (gpu_carry/MANIFEST)"
    [[ -f gpu_carry/MANIFEST ]] || { echo "error: GPU_CARRY=1 but gpu_carry/MANIFEST was not carried"; exit 3; }
    PYTHON=${PYTHON:-python3}
    want=$(awk '$1 == "python" {print $2}' gpu_carry/MANIFEST)
    have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $want != "$have" ]]; then
        echo "error: the carried wheels are for Python $want, $PYTHON is $have: run scripts/gpu_wheelhouse.sh cp${have/./}"
        exit 3
    fi
    missing=()
    while read -r kind name sum; do
        [[ $kind == part ]] || continue
        if [[ ! -f gpu_carry/$name ]] || [[ $(sha256sum < "gpu_carry/$name" | cut -d' ' -f1) != "$sum" ]]; then
            missing+=("gpu_carry/$name")
        fi
    done < gpu_carry/MANIFEST
    if (( ${#missing[@]} )); then
        echo "error: missing or damaged: ${missing[*]}; carry them again (benchmarks/GPU.md)"
        exit 3
    fi
    CARRY=${TMPDIR:-/tmp}/gpu_carry
    rm -rf "$CARRY" && mkdir -p "$CARRY"
    cat gpu_carry/part-* | tar -x -C "$CARRY"
    if [[ ! -f models/minilm/model.onnx && -d $CARRY/models/minilm ]]; then
        mkdir -p models && cp -r "$CARRY/models/minilm" models/
    fi
    # onnxruntime-gpu and Ray exactly; the rest at least the carried version, so that a newer
    # one the image has stays
    wanted=$(cd "$CARRY/wheels" && ls *.whl | sed -E 's/^([A-Za-z0-9_.]+)-([^-]+)-.*/\1>=\2/' \
        | tr '_' '-' | sed -E 's/^(onnxruntime-gpu|ray)>=/\1==/')
    if "$PYTHON" -m pip show -q onnxruntime >/dev/null 2>&1; then
        echo "   replacing the CPU onnxruntime $("$PYTHON" -m pip show onnxruntime | awk '/^Version/ {print $2}') by onnxruntime-gpu"
        "$PYTHON" -m pip uninstall -y -q onnxruntime
    fi
    echo "   pip install --no-index: $(echo "$wanted" | xargs)"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --find-links "$CARRY/wheels" --no-cache-dir --no-compile \
        --root-user-action=ignore $wanted
    echo "   installed in $SECONDS s"
fi

echo "== GPU (nvidia-smi)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader \
        || echo "nvidia-smi failed: the driver cannot reach a GPU"
else
    echo "nvidia-smi not found: no NVIDIA driver here (in a container: docker run --gpus all)"
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        echo "== creating .venv: pip install -e '.[cuda]'"
        python3 -m venv .venv
        .venv/bin/pip install -q -e '.[cuda]'
    fi
    PYTHON=.venv/bin/python
fi

"$PYTHON" - "$MODEL" "$RUNS" "$RESULT" "$PROVIDER" <<'PY'
import contextlib
import ctypes
import importlib.metadata
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from packaging.requirements import Requirement

from pipeline.providers import cuda_options, node_placement, placement_summary, session_config

model, runs, result_path, dry_run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "cpu"
BATCH, LENGTH = 64, 128
if not Path(model).is_file():
    sys.exit(f"error: {model} does not exist: build it with `make models` (or set MODEL=...)")

print(f"== onnxruntime {ort.__version__}, available providers: {ort.get_available_providers()}")
ort.set_default_logger_severity(3)


def missing_cuda_wheels() -> list[str]:
    """Wheels of onnxruntime-gpu's cuda/cudnn extras that are not installed."""
    try:
        requires = importlib.metadata.requires("onnxruntime-gpu") or []
    except importlib.metadata.PackageNotFoundError:
        return ["onnxruntime-gpu (this is the CPU-only onnxruntime)"]
    missing = []
    for text in requires:
        req = Requirement(text)
        if req.marker and any(req.marker.evaluate({"extra": e}) for e in ("cuda", "cudnn")):
            try:
                importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(req.name)
    return missing


missing = missing_cuda_wheels()
if missing:
    print(f"   not installed: {', '.join(missing)} (install the project's cuda extra: pip install -e '.[cuda]')")
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # loads the CUDA and cuDNN wheels' libraries; prints "Failed to load ..." if missing


def options(config: dict[str, str]) -> ort.SessionOptions:
    so = ort.SessionOptions()
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return so


chain = ["CUDAExecutionProvider", "CPUExecutionProvider"]
started = time.perf_counter()
session = ort.InferenceSession(model, options(session_config(("cuda", "cpu"))), providers=chain,
                               provider_options=[cuda_options(0), {}])
create_s = time.perf_counter() - started
providers = session.get_providers()
placement = placement_summary(node_placement(session))
print(f"== session providers: {providers} (created in {create_s:.1f}s)")
print(f"   nodes: {placement}")
on_gpu = providers[0] == "CUDAExecutionProvider"
result = {"onnxruntime": ort.__version__, "providers": providers, "placement": placement,
          "session_create_s": round(create_s, 2)}

if on_gpu:  # would a session that forbids CPU nodes be accepted? (pipeline.providers.session_config)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ort.InferenceSession(model, options(session_config(("cuda",), strict=True)),
                                 providers=["CUDAExecutionProvider"], enable_fallback=0)
        strict = "accepted"
    except Exception as exc:
        strict = "refused: " + " ".join(str(exc).split())[:200]
    print(f"== strict session (session.disable_cpu_ep_fallback=1, CUDA only): {strict}")
    result["strict"] = strict
    try:
        ctypes.CDLL("libnvinfer.so.10")
        trt = "libnvinfer.so.10 loads"
    except OSError as exc:
        trt = f"not loadable ({exc})"
    print(f"== TensorRT: {trt}")
    result["tensorrt_libs"] = trt

rng = np.random.default_rng(0)
tokens = {
    "input_ids": rng.integers(1000, 30000, size=(BATCH, LENGTH), dtype=np.int64),
    "attention_mask": np.ones((BATCH, LENGTH), dtype=np.int64),
    "token_type_ids": np.zeros((BATCH, LENGTH), dtype=np.int64),
}
names = [i.name for i in session.get_inputs()]
unknown = [n for n in names if n not in tokens]
if unknown:
    sys.exit(f"error: {model} has inputs {unknown}; this check feeds only {sorted(tokens)}")
feeds = {n: tokens[n] for n in names}
if on_gpu:
    session.run(None, feeds)  # warm-up: kernels, cuBLAS plans and the memory arena
else:
    runs = 1  # the CPU fallback: one run is enough to compare, and slow
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feeds)
    times.append(time.perf_counter() - start)
mean = sum(times) / len(times)
print(f"== {BATCH} x {LENGTH} tokens on {providers[0]}: mean {mean * 1000:.1f} ms, "
      f"min {min(times) * 1000:.1f} ms over {runs} run{'s' if runs > 1 else ''} ({BATCH / mean:.0f} sequences/s)")
result["batch_64x128_ms"] = round(mean * 1000, 2)
Path(result_path).write_text(json.dumps(result))

if not on_gpu and dry_run:
    print("PROVIDER=cpu: a dry run on the CPU, going on")
elif not on_gpu:
    try:  # PyTorch's CUDA wheels, once loaded, serve onnxruntime too: does that change anything?
        import torch  # noqa: F401

        again = ort.InferenceSession(model, providers=chain, provider_options=[cuda_options(0), {}])
        if again.get_providers()[0] == "CUDAExecutionProvider":
            print("   with torch imported first CUDA loads: preload_dlls did not find the CUDA 13 "
                  "and cuDNN 9 libraries next to onnxruntime (nvidia/cu13/lib, nvidia/cudnn/lib)")
    except ImportError:
        pass
    sys.exit(
        f"error: CUDAExecutionProvider is not the session's first provider (got {providers}): "
        "onnxruntime fell back to the CPU. Look above for nvidia-smi's output, 'Failed to load' lines "
        "and onnxruntime's CUDA errors: no GPU or driver, a driver too old for onnxruntime's CUDA major, "
        "missing CUDA/cuDNN wheels (the project's cuda extra), or a CPU-only onnxruntime.")
else:
    print("OK: onnxruntime runs this model on the GPU")
PY

bench() {  # bench NAME SECONDS ARGS...: one gpu_bench run, stopped at its time box
    local name=$1 box=$2 log=${TMPDIR:-/tmp}/gpu_bench_$1.log rc; shift 2
    echo "== gpu_bench $name ($box s at most): $*"
    set +e
    timeout --signal=TERM --kill-after=15 "$box" "$PYTHON" -m benchmarks.gpu_bench "$@" 2>&1 \
        | tee "$log" | grep --line-buffered -v '^GPU_BENCH '
    rc=${PIPESTATUS[0]}
    set -e
    (( rc == 0 )) || echo "   gpu_bench $name: exit $rc$( (( rc == 124 )) && echo ' (its time box)')"
    grep '^GPU_BENCH ' "$log" | sed "s/^GPU_BENCH /$name /" >> "$RESULT.parts" || true
}
rm -f "$RESULT.parts"
box=$(( $(left) - 20 ))
if (( box > 60 )); then
    raw_s=${RAW_S:-$(( box > 300 ? 40 : 20 ))}
    bench "$PROVIDER" "$box" --provider "$PROVIDER" --rows "$ROWS" --raw-seconds "$raw_s" \
        --ray-timeout $(( box - raw_s - 70 )) --ray-cpus "$RAY_CPUS"
else
    echo "== gpu_bench skipped: $(left) s left of BUDGET_S=$BUDGET_S"
fi
if grep -q "libnvinfer.so.10 loads" "$RESULT" && (( $(left) > 90 )); then
    bench tensorrt $(( $(left) - 20 )) --provider tensorrt --rows "$ROWS" --raw-seconds 10 \
        --skip score --skip ray
fi

"$PYTHON" - "$RESULT" "$SECONDS" <<'PY'
import json
import os
import sys
from pathlib import Path

result = json.loads(Path(sys.argv[1]).read_text())
parts = Path(sys.argv[1] + ".parts")
for line in parts.read_text().splitlines() if parts.exists() else []:
    name, _, data = line.partition(" ")
    result[f"bench_{name}"] = json.loads(data)
result["check_s"] = int(sys.argv[2])
text = json.dumps(result, separators=(",", ":"))
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    for log in Path(sys.argv[1]).parent.glob("gpu_bench_*.log"):
        Path(os.environ["OUT"], log.name).write_text(log.read_text())
print("GPU_CHECK " + text)
PY

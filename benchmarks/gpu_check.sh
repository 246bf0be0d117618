#!/usr/bin/env bash
# Does onnxruntime really run on the GPU here? For a machine WITH an NVIDIA GPU; not part of
# `make test`. It prints the GPU and driver (nvidia-smi), the providers that an InferenceSession of
# models/minilm/model.onnx really got, and the mean latency of a batch of 64 sequences of 128
# tokens, and exits 1 unless CUDAExecutionProvider is the first of those providers: listing it
# (ort.get_available_providers()) is not enough, as onnxruntime quietly falls back to the CPU when
# the CUDA or cuDNN libraries, the driver or the GPU are missing.
#
#   make models && bash benchmarks/gpu_check.sh      # the project's .venv (created if missing)
#   PYTHON=python bash benchmarks/gpu_check.sh       # another interpreter, e.g. in the image:
#   docker run --rm --gpus all -e PYTHON=python -v "$PWD/models:/home/ray/pipeline/models:ro" \
#     ghcr.io/example/onnx-ray-pipeline:latest bash benchmarks/gpu_check.sh
#   MODEL=path/to/model.onnx RUNS=50 bash benchmarks/gpu_check.sh
#
# Needs an NVIDIA driver for the CUDA major of onnxruntime-gpu (CUDA 13: driver >= 580) and the
# project's `cuda` extra (the CUDA runtime and cuDNN wheels; infra/Dockerfile installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/minilm/model.onnx}
RUNS=${RUNS:-10}

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

exec "$PYTHON" - "$MODEL" "$RUNS" <<'PY'
import importlib.metadata
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from packaging.requirements import Requirement

model, runs = sys.argv[1], int(sys.argv[2])
BATCH, LENGTH = 64, 128
if not Path(model).is_file():
    sys.exit(f"error: {model} does not exist: build it with `make models` (or set MODEL=...)")

print(f"== onnxruntime {ort.__version__}, available providers: {ort.get_available_providers()}")


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

session = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
providers = session.get_providers()
print(f"== session providers: {providers}")

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
on_gpu = providers[0] == "CUDAExecutionProvider"
if on_gpu:
    session.run(None, feeds)  # warm-up: kernels, cuDNN plans and the memory arena
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

if not on_gpu:
    sys.exit(
        f"error: CUDAExecutionProvider is not the session's first provider (got {providers}): "
        "onnxruntime fell back to the CPU. Look above for nvidia-smi's output, 'Failed to load' lines "
        "and onnxruntime's CUDA errors: no GPU or driver, a driver too old for onnxruntime's CUDA major, "
        "missing CUDA/cuDNN wheels (the project's cuda extra), or a CPU-only onnxruntime.")
print("OK: onnxruntime runs this model on the GPU")
PY

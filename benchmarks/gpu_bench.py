"""MiniLM on a GPU: the raw onnxruntime loop against the pipeline, with model FLOP utilization.

    python -m benchmarks.gpu_bench                      # CUDA, on a machine with a GPU
    python -m benchmarks.gpu_bench --provider cpu --rows 500 --raw-seconds 5 --skip ray

(benchmarks/gpu_check.sh runs it on the lent GPU machine; benchmarks/GPU.md says how.)

1. raw: the texts tokenized up front, sorted by length and cut into batches by the same token
   budget as the pipeline; session.run and run_bound (IOBinding) over them, pass after pass,
   for --raw-seconds. The model's ceiling on this device with this batching.
2. score: pipeline.api.Scorer in this process (tokenize, sort, batch, infer, restore order).
3. ray: python -m pipeline.run with one GPU actor on a local Ray, texts from Parquet, output
   to Parquet; the report's rows/s over the whole run and between first and last commit.

FLOPs per row of n tokens (BERT encoder, matmuls only; embeddings, norms, softmax ignored):
    2 * L * (4 * H^2 + 2 * H * I) * n   (QKV and output projections, feed-forward)
  + 4 * L * H * n^2                    (attention scores and weighted sum)
with H hidden size, I intermediate size, L layers from bundle.yaml's source.config; for
all-MiniLM-L6-v2 (H 384, I 1536, L 6) that is 21.2 MFLOP per token plus the attention term.
Real tokens count, not padding: MFU is useful work over the GPU's dense peak. The model is
float32, which the CUDA EP runs as TF32 on tensor cores (use_tf32 defaults on), so MFU is
printed against both the dense FP16 and the dense TF32 peak.

The last line is one JSON object (prefix "GPU_BENCH ") with every figure. Exit 1 when a GPU
provider was asked for and the session runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# name fragment (lower case) -> dense TFLOPS (FP16, TF32), NVIDIA datasheets, no sparsity
PEAKS = [("h100 pcie", 756, 378), ("h100 nvl", 835, 418), ("h100", 989, 495),
         ("h200", 989, 495), ("gh200", 989, 495), ("b200", 2250, 1100), ("a100", 312, 156),
         ("l40s", 362, 183), ("l4", 121, 60), ("a10", 125, 62.5)]


def gpu_info() -> dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        name, driver, memory = [s.strip() for s in out.stdout.splitlines()[0].split(",")]
    except Exception:
        return {"name": None, "driver": None, "peak_fp16_tflops": None, "peak_tf32_tflops": None}
    lower = name.lower()
    fp16, tf32 = next(((f, t) for key, f, t in PEAKS if key in lower), (None, None))
    return {"name": name, "driver": driver, "memory": memory, "peak_fp16_tflops": fp16,
            "peak_tf32_tflops": tf32}


def row_flops(lengths: np.ndarray, config: dict[str, int]) -> float:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    n = lengths.astype(np.float64)
    return float((2 * layers * (4 * h * h + 2 * h * i) * n + 4 * layers * h * n * n).sum())


def make_batches(encodings: list, names: dict[str, str], max_rows: int,
                 max_tokens: int) -> list[dict[str, np.ndarray]]:
    """Sorted by length, cut so that rows x longest <= max_tokens (as pipeline.tasks.text)."""
    lengths = np.array([len(e.ids) for e in encodings])
    order = np.argsort(lengths, kind="stable")
    fields = {"tokens.ids": "ids", "tokens.attention_mask": "attention_mask",
              "tokens.type_ids": "type_ids"}
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < max_rows
               and (end - start + 1) * lengths[order[end]] <= max_tokens):
            end += 1
        picked = [encodings[k] for k in order[start:end]]
        width = max(len(e.ids) for e in picked)
        feeds = {}
        for name, role in names.items():
            arr = np.zeros((len(picked), width), dtype=np.int64)
            for r, e in enumerate(picked):
                values = getattr(e, fields[role])
                arr[r, :len(values)] = values
            feeds[name] = arr
        batches.append(feeds)
        start = end
    return batches


def open_session(model: Path, provider: str, bundle: dict[str, Any], args):
    import onnxruntime as ort

    from pipeline.providers import (
        TensorrtContext,
        graph_input_shapes,
        make_cache_dirs,
        provider_options,
        session_config,
        tensorrt_cache_dir,
    )

    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}[provider]
    if provider != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    ctx = TensorrtContext(tensorrt_cache_dir(args.trt_cache, bundle["sha256"], gpu_info()["name"]),
                          bundle["inputs"], graph_input_shapes(model), args.max_rows,
                          args.max_tokens, bundle["text"]["max_length"])
    options = provider_options(chain, {}, 0, ctx)
    if "tensorrt" in options:
        make_cache_dirs(options["tensorrt"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for key, value in session_config(chain).items():
        so.add_session_config_entry(key, value)
    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
    started = time.perf_counter()
    session = ort.InferenceSession(str(model), so, providers=[names[p] for p in chain],
                                   provider_options=[options[p] for p in chain])
    return session, time.perf_counter() - started, options


def raw(args, texts: list[str], bundle_dir: Path, bundle: dict[str, Any]) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from pipeline.providers import node_placement, placement_summary, run_bound

    tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(bundle["text"]["max_length"])
    started = time.perf_counter()
    encodings = tokenizer.encode_batch(texts)
    tokenize_s = time.perf_counter() - started
    lengths = np.array([len(e.ids) for e in encodings])
    batches = make_batches(encodings, bundle["inputs"], args.max_rows, args.max_tokens)
    padded = sum(next(iter(b.values())).size for b in batches)

    session, create_s, _ = open_session(bundle_dir / bundle["model_file"], args.provider, bundle, args)
    providers = session.get_providers()
    placed = placement_summary(node_placement(session))
    print(f"== raw: session providers {providers}; placement: {placed}; created in {create_s:.1f}s",
          flush=True)
    output = bundle["outputs"]["embedding"]
    device = "cpu" if args.provider == "cpu" else "cuda"
    started = time.perf_counter()
    for feeds in batches:  # warm-up: every shape once (cuBLAS heuristics, arena growth)
        session.run([output], feeds)
    warm_s = time.perf_counter() - started

    def timed(run) -> tuple[float, int]:
        passes, start = 0, time.perf_counter()
        while passes == 0 or time.perf_counter() - start < args.raw_seconds / 2:
            for feeds in batches:
                run(feeds)
            passes += 1
        return (time.perf_counter() - start) / passes, passes

    run_s, run_passes = timed(lambda f: session.run([output], f))
    bound_s, bound_passes = timed(lambda f: run_bound(session, [output], f, device, 0))
    check = run_bound(session, [output], batches[0], device, 0)[0]
    same = bool(np.allclose(check, session.run([output], batches[0])[0], atol=1e-5))
    best = min(run_s, bound_s)
    flops = row_flops(lengths, bundle["source"]["config"])
    return {"providers": providers, "placement": placed, "session_create_s": round(create_s, 2),
            "warmup_s": round(warm_s, 2), "rows": len(texts), "batches": len(batches),
            "tokens": int(lengths.sum()), "padded_tokens": int(padded),
            "tokenize_rows_per_s": round(len(texts) / tokenize_s),
            "run_pass_s": round(run_s, 4), "run_passes": run_passes,
            "bound_pass_s": round(bound_s, 4), "bound_passes": bound_passes,
            "bound_equals_run": same, "rows_per_s": round(len(texts) / best),
            "tokens_per_s": round(int(lengths.sum()) / best), "tflops": round(flops / best / 1e12, 2)}


def score(args, texts: list[str], bundle_dir: Path) -> dict[str, Any]:
    import pyarrow as pa

    from pipeline.api import Scorer
    from pipeline.spec import BatchingSpec

    providers = {"cpu": ("cpu",), "cuda": ("cuda", "cpu"),
                 "tensorrt": ("tensorrt", "cuda", "cpu")}[args.provider]
    scorer = Scorer(str(bundle_dir), "embed", providers,
                    BatchingSpec(max_rows=args.max_rows, max_tokens=args.max_tokens))
    table = pa.table({"text": texts})
    scorer.score(table.slice(0, min(len(texts), 2000)))  # warm-up
    started = time.perf_counter()
    out = scorer.score(table)
    seconds = time.perf_counter() - started
    active = getattr(scorer.session, "active", None)
    print(f"== score: {len(texts)} rows in {seconds:.2f}s on {active}", flush=True)
    return {"provider": active, "rows": out.num_rows, "seconds": round(seconds, 3),
            "rows_per_s": round(len(texts) / seconds)}


def ray_job(args, texts: list[str], bundle_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    (work / "in").mkdir()
    per_file = max(1, len(texts) // 8)
    for k in range(0, len(texts), per_file):
        pq.write_table(pa.table({"id": np.arange(k, k + len(texts[k:k + per_file])),
                                 "text": texts[k:k + per_file]}),
                       work / "in" / f"part-{k // per_file:03d}.parquet")
    gpu = args.provider != "cpu"
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}
    job = {
        "name": "gpu-bench", "input": {"uri": str(work / "in")}, "model": {"uri": str(bundle_dir)},
        "task": {"kind": "embed", "text_column": "text"}, "passthrough": ["id"],
        "batching": {"max_rows": args.max_rows, "max_tokens": args.max_tokens},
        "sharding": {"rows_per_shard": max(1, len(texts) // 16)},
        "workers": {"gpu": {"replicas": 1, "gpus": 1, "cpus": args.ray_cpus} if gpu
                    else {"replicas": 0},
                    "cpu": {"replicas": 0} if gpu else {"replicas": 1, "cpus": args.ray_cpus},
                    "max_in_flight": 3},
        "providers": {"gpu": chain[args.provider]} if gpu else {"cpu": ["cpu"]},
        "output": {"uri": str(work / "out"), "mode": "overwrite"},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path.cwd()), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.run", str(work / "job.yaml"),
                               "--no-progress"], env=env, timeout=args.ray_timeout,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.ray_timeout}s"}
    wall = time.perf_counter() - started
    report_path = work / "out" / "_pipeline" / "report.json"
    if not report_path.exists():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:600]}"}
    report = json.loads(report_path.read_text())
    shutil.rmtree(work, ignore_errors=True)
    points = report["timeline"]
    steady = None
    if len(points) > 2 and points[-1]["t"] > points[0]["t"]:
        steady = (points[-1]["rows"] - points[0]["rows"]) / (points[-1]["t"] - points[0]["t"])
    result = {"exit_code": proc.returncode, "process_s": round(wall, 2),
              "wall_s": report["wall_s"], "rows": report["totals"]["rows_in"],
              "rows_per_s": report["totals"]["rows_per_s"],
              "steady_rows_per_s": round(steady) if steady else None,
              "first_shard_s": report["totals"]["first_shard_s"],
              "providers": report["providers"], "fallbacks": report["fallbacks"],
              "pools": report["pools"]}
    print(f"== ray: {result['rows']} rows, exit {proc.returncode}, wall {report['wall_s']:.1f}s, "
          f"{result['rows_per_s']} rows/s, steady {result['steady_rows_per_s']} rows/s, "
          f"providers {report['providers']}, fallbacks {report['fallbacks']}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", choices=["cuda", "tensorrt", "cpu"], default="cuda")
    parser.add_argument("--model", default="models/minilm")
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--max-rows", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--raw-seconds", type=float, default=40)
    parser.add_argument("--ray-timeout", type=float, default=240)
    parser.add_argument("--ray-cpus", type=float, default=4)
    parser.add_argument("--trt-cache", default=os.path.join(tempfile.gettempdir(), "gpu-bench-cache"))
    parser.add_argument("--skip", action="append", default=[], choices=["score", "ray"])
    args = parser.parse_args()

    from pipeline.demo.text import make_text_table

    bundle_dir = Path(args.model)
    bundle = yaml.safe_load((bundle_dir / "bundle.yaml").read_text())
    texts = make_text_table(args.rows, seed=7)["text"].to_pylist()
    gpu = gpu_info()
    print(f"== {gpu['name'] or 'no NVIDIA GPU'} (driver {gpu['driver']}); {args.rows} texts, "
          f"max_rows {args.max_rows}, max_tokens {args.max_tokens}, provider {args.provider}",
          flush=True)
    summary: dict[str, Any] = {"gpu": gpu, "provider": args.provider, "rows": args.rows,
                               "max_rows": args.max_rows, "max_tokens": args.max_tokens}
    summary["raw"] = r = raw(args, texts, bundle_dir, bundle)
    for peak in ("fp16", "tf32"):
        value = gpu[f"peak_{peak}_tflops"]
        summary[f"mfu_{peak}"] = round(r["tflops"] / value, 4) if value else None
    fell_back = args.provider != "cpu" and r["providers"][0] == "CPUExecutionProvider"
    print(f"== raw: {r['rows_per_s']:,} rows/s, {r['tokens_per_s']:,} tokens/s, "
          f"{r['tflops']} TFLOP/s (MFU {summary['mfu_fp16'] or 'unknown'} of dense FP16 peak, "
          f"{summary['mfu_tf32'] or 'unknown'} of TF32); pass {r['run_pass_s']}s with run, "
          f"{r['bound_pass_s']}s with IOBinding; padding {r['padded_tokens'] / r['tokens']:.2f}x",
          flush=True)
    if fell_back:
        print("error: the GPU session runs on the CPU; skipping the pipeline runs", flush=True)
    else:
        if "score" not in args.skip:
            summary["score"] = score(args, texts, bundle_dir)
            summary["score_over_raw"] = round(summary["score"]["rows_per_s"] / r["rows_per_s"], 3)
        if "ray" not in args.skip:
            summary["ray"] = j = ray_job(args, texts, bundle_dir)
            if j.get("steady_rows_per_s"):
                summary["ray_over_raw"] = round(j["steady_rows_per_s"] / r["rows_per_s"], 3)
    print("GPU_BENCH " + json.dumps(summary, separators=(",", ":")), flush=True)
    return 1 if fell_back else 0


if __name__ == "__main__":
    sys.exit(main())

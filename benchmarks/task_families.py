"""The task families against their frameworks' own batch loops, on the same ONNX files and the
same rows, in one run (``make bench-tasks``):

- NER: ``python -m pipeline.run`` (start-up included, the product's defaults) against
  transformers' token-classification pipeline on Optimum's ``ORTModelForTokenClassification``
  with ``batch_size=32`` (``benchmarks/ner_baseline.py`` in ``.venv-conform``), on MiniLM-L6
  with a token-classification head (22M parameters, built and trained briefly by the
  baseline's ``build`` step), 20,000 texts of one to four sentences (two shards of the
  default 10,000 rows: both cores busy);
- detection: ``python -m pipeline.run`` with ``input.format: images`` against ultralytics'
  own ``predict`` (``benchmarks/yolo_baseline.py`` in ``.venv-yolo``, ``batch=16``) on the
  conformance case's YOLO11 export (imgsz 128: decoding and letterboxing weigh more than
  the model, which is what the two sides do differently), 8,000 JPEG photos of 640x480
  shapes.

Start-up (Ray, workers, the model: about 9 s) is included on the pipeline's side; the inputs
are large enough that it does not dominate.

Both sides use every core. Outputs are compared entity by entity and box by box, so the
ratios are at equal outputs.

    python -m benchmarks.task_families [--texts 20000] [--images 8000] [--skip ner,detect]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.throughput import run_json, timed_job

REPO = Path(__file__).resolve().parents[1]
YOLO_MODEL = REPO / "tests" / "conformance" / "cases" / "ultralytics_yolo_raw" / "src"


def ner(work: Path, rows: int, threads: int) -> dict[str, Any]:
    model = work / "ner"
    if not (model / "onnx" / "model.onnx").exists() or \
            pq.read_metadata(model / "texts.parquet").num_rows != rows:
        _run([str(REPO / ".venv-conform/bin/python"), "-m", "benchmarks.ner_baseline",
              "build", "--out", str(model), "--rows", str(rows)])
    baseline = run_json([str(REPO / ".venv-conform/bin/python"), "-m", "benchmarks.ner_baseline",
                         "run", "--model", str(model / "onnx"), "--texts",
                         str(model / "texts.parquet"), "--threads", str(threads)])
    out = work / "out-ner"
    job = {"name": "bench-ner", "input": {"uri": str(model / "texts.parquet")},
           "model": {"uri": str(model / "onnx")}, "passthrough": ["id"],
           "output": {"uri": str(out), "mode": "overwrite"}}
    seconds, report, _ = timed_job(job, work, "ner")
    table = pq.read_table(out, columns=["id", "entities"]).sort_by("id")
    ours = [[[e["entity_group"], e["word"], e["start"], e["end"], e["score"]] for e in row]
            for row in table["entities"].to_pylist()]
    return {"pipeline": {"seconds": seconds, "rows": table.num_rows,
                         "workers": len(report["workers"])},
            "transformers": {"seconds": baseline["seconds"], "rows": baseline["rows"]},
            "same": _same_entities(ours, baseline["entities"]),
            "entities": sum(map(len, ours))}


def _run(cmd: list[str]) -> None:
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {done.returncode}: {done.stderr[-800:]}")


def _same_entities(ours: list, theirs: list) -> str:
    rows = sum(1 for a, b in zip(ours, theirs, strict=True)
               if len(a) == len(b) and all(x[:4] == y[:4] and abs(x[4] - y[4]) <= 1e-4
                                           for x, y in zip(a, b, strict=True)))
    return f"{rows} of {len(ours)} rows equal"


def photos(folder: Path, count: int) -> None:
    """640x480 JPEG scenes of the shapes the detection model was trained on."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_detection_cases import draw_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    for i in range(count):
        image, _ = draw_scene(rng, 640, 480)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())


def detect(work: Path, count: int, threads: int) -> dict[str, Any]:
    folder = work / "photos"
    if len(list(folder.glob("*.jpg"))) != count:
        photos(folder, count)
    baseline = run_json([str(REPO / ".venv-yolo/bin/python"), "-m", "benchmarks.yolo_baseline",
                         "--model", str(YOLO_MODEL / "model.onnx"), "--folder", str(folder),
                         "--threads", str(threads)])
    out = work / "out-detect"
    job = {"name": "bench-detect", "input": {"uri": str(folder), "format": "images"},
           "model": {"uri": str(YOLO_MODEL)}, "passthrough": ["path"],
           "output": {"uri": str(out), "mode": "overwrite"}}
    seconds, report, _ = timed_job(job, work, "detect")
    table = pq.read_table(out, columns=["path", "detections"])
    ours = {Path(p).name: d for p, d in zip(table["path"].to_pylist(),
                                            table["detections"].to_pylist(), strict=True)}
    same = sum(1 for name, found in ours.items() if _same_boxes(found, baseline["detections"][name]))
    return {"pipeline": {"seconds": seconds, "rows": table.num_rows,
                         "workers": len(report["workers"])},
            "ultralytics": {"seconds": baseline["seconds"], "rows": baseline["rows"]},
            "same": f"{same} of {len(ours)} images equal",
            "boxes": sum(map(len, ours.values()))}


def _same_boxes(ours: list, theirs: list) -> bool:
    return len(ours) == len(theirs) and all(
        a["label"] == b[0] and abs(a["score"] - b[1]) <= 1e-4 and
        float(np.abs(np.array(a["box"]) - np.array(b[2])).max()) <= 1.0
        for a, b in zip(ours, theirs, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", default="")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench" / "tasks.json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if "ner" not in skip:
        print("running ner ...", file=sys.stderr, flush=True)
        results["ner"] = ner(args.work, args.texts, args.threads)
    if "detect" not in skip:
        print("running detect ...", file=sys.stderr, flush=True)
        results["detect"] = detect(args.work, args.images, args.threads)
    print(f"\n{os.cpu_count()} CPUs, {args.threads} threads per side\n")
    print("| task | rows | pipeline rows/s | baseline | baseline rows/s | ratio | outputs |")
    print("|---|---|---|---|---|---|---|")
    for task, baseline in (("ner", "transformers"), ("detect", "ultralytics")):
        r = results.get(task)
        if not r:
            continue
        ours = r["pipeline"]["rows"] / r["pipeline"]["seconds"]
        theirs = r[baseline]["rows"] / r[baseline]["seconds"]
        print(f"| {task} | {r['pipeline']['rows']:,} | {ours:,.1f} | {baseline} | "
              f"{theirs:,.1f} | {ours / theirs:.2f}x | {r['same']} |")
    args.json.write_text(json.dumps({"results": results, "cpus": os.cpu_count(),
                                     "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The detection benchmark's side of ultralytics (run in .venv-yolo, never in the project's
venv): ultralytics' own predictor on the ONNX file, over the image files.

    .venv-yolo/bin/python -m benchmarks.yolo_baseline --model FILE.onnx --folder DIR [--batch 16]

``YOLO(model).predict(paths, imgsz, batch, stream=True)``, timed from the model load; prints a
JSON line with the seconds and every image's detections (label, score, box).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(args.threads)
    paths = [str(p) for p in sorted(args.folder.glob("*.jpg"))]
    started = time.perf_counter()
    model = YOLO(str(args.model), task="detect")
    found = {}
    for result in model.predict(paths, imgsz=args.imgsz, batch=args.batch, device="cpu",
                                stream=True, verbose=False):
        boxes = result.boxes
        found[Path(result.path).name] = [
            [result.names[int(c)], float(s), [float(v) for v in xyxy]]
            for xyxy, s, c in zip(boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy(),
                                  strict=True)]
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rows": len(paths), "detections": found}))


if __name__ == "__main__":
    main()

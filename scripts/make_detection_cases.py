"""Write the object-detection conformance cases: tiny YOLO models trained briefly by
ultralytics on synthetic shapes, exported to ONNX in its three output layouts, with what
ultralytics' own predictor returns for each test image (dev-only; ultralytics is AGPL and
needs PyTorch, so it runs in its own side environment, ``make detection-env``, and never
becomes a dependency).

    make detection-models   (or .venv-yolo/bin/python scripts/make_detection_cases.py)

Cases (``tests/conformance/cases/<name>``, as make_conformance_models.py writes them):

- ``ultralytics_yolo_raw``: YOLO11 layout, dynamic export: ``output0 [B, 4+nc, anchors]``;
- ``ultralytics_yolo_nms``: the same model exported with ``nms=True`` (static, batch 1):
  ``[B, max_det, 6]``;
- ``ultralytics_yolo26_end2end``: YOLO26, end-to-end (no NMS), dynamic: ``[B, 300, 6]``.

The reference is ``YOLO(onnx_file).predict(path)`` on image files, one at a time, as a user
runs it: boxes x1, y1, x2, y2 in the original image's pixels, scores, class names.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

os.environ.setdefault("YOLO_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CLASSES = ["box", "disc", "bar"]
IMGSZ = 128
DETECTION = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32()),
                                ("box", pa.list_(pa.float32(), 4))]))


def draw_scene(rng: random.Random, width: int, height: int) -> tuple[Image.Image, list]:
    """Shapes on a noisy background: red boxes, green discs, blue bars; YOLO labels."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(60, 200, (height, width, 3))
    image = Image.fromarray(noise.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    labels = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(3)
        size = rng.uniform(0.15, 0.4) * min(width, height)
        w, h = (size, size) if kind < 2 else (size * 2.2, size * 0.45)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        color = [(220, 30, 30), (30, 200, 30), (30, 30, 220)][kind]
        if kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        labels.append((kind, (x0 + w / 2) / width, (y0 + h / 2) / height, w / width, h / height))
    return image, labels


def dataset(root: Path, count: int) -> Path:
    rng = random.Random(7)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count if split == "train" else count // 4):
            w, h = rng.choice([(128, 128), (160, 120), (120, 160), (200, 100)])
            image, labels = draw_scene(rng, w, h)
            image.save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text(
                "".join(f"{k} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}\n" for k, x, y, bw, bh in labels))
    config = root / "shapes.yaml"
    config.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n" +
                      "".join(f"  {i}: {n}\n" for i, n in enumerate(CLASSES)))
    return config


def tiny(config: str) -> dict:
    """An ultralytics model config at a scale smaller than n (a few hundred KB of weights)."""
    import yaml
    from ultralytics.utils import ROOT

    found = next(ROOT.glob(f"cfg/models/**/{config}"))
    data = yaml.safe_load(found.read_text())
    data["scales"] = {"t": [0.33, 0.125, 256]}
    data["scale"] = "t"
    data["nc"] = len(CLASSES)
    return data


def train(config: str, data: Path, work: Path, epochs: int):
    import yaml
    from ultralytics import YOLO

    path = work / f"{config.replace('.yaml', '')}-t.yaml"
    path.write_text(yaml.safe_dump(tiny(config)))
    model = YOLO(str(path))
    model.train(data=str(data), epochs=epochs, imgsz=IMGSZ, batch=16, device="cpu", workers=0,
                plots=False, val=False, amp=False, seed=0, deterministic=True, verbose=False,
                project=str(work / "runs"), name=config, exist_ok=True, mosaic=0.0)
    return model


def test_images(folder: Path) -> list[tuple[str, bytes]]:
    """Images of other sizes and kinds: 640x480 JPEG (runs as 128x96 when dynamic), a tall
    PNG, WebP, an RGBA PNG (alpha dropped), grayscale, a JPEG with EXIF rotation (applied)."""
    rng = random.Random(11)
    specs = [((640, 480), "JPEG", "RGB", None), ((300, 500), "PNG", "RGB", None),
             ((128, 128), "WEBP", "RGB", None), ((257, 131), "PNG", "RGBA", None),
             ((320, 240), "PNG", "L", None), ((400, 300), "JPEG", "RGB", 6),
             ((90, 200), "JPEG", "RGB", None), ((1000, 250), "PNG", "RGB", None)]
    out = []
    folder.mkdir(parents=True)
    for i, (size, kind, mode, orientation) in enumerate(specs):
        image, _ = draw_scene(rng, *size)
        image = image.convert(mode)
        buffer = io.BytesIO()
        options = {"quality": 92} if kind in ("JPEG", "WEBP") else {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            options["exif"] = exif.tobytes()
        image.save(buffer, format=kind, **options)
        name = f"{i}-{mode}.{kind.lower()}"
        (folder / name).write_bytes(buffer.getvalue())
        out.append((name, buffer.getvalue()))
    return out


def references(onnx_file: Path, images: Path, names: list[str],
               squared: list[str]) -> list[list[dict]]:
    """ultralytics' predictions, image by image. Where the graph fails on the stride
    rectangle (an end-to-end head's TopK asks for more boxes than a small input has anchors),
    the image is predicted on the full square (``rect=False``) and named in ``squared``."""
    from ultralytics import YOLO

    model = YOLO(str(onnx_file), task="detect")
    rows = []
    for name in names:
        try:
            result = model.predict(str(images / name), imgsz=IMGSZ, device="cpu",
                                   verbose=False)[0]
        except Exception as exc:  # onnxruntime's Fail
            if "TopK" not in str(exc):
                raise
            squared.append(name)
            result = model.predict(str(images / name), imgsz=IMGSZ, device="cpu",
                                   verbose=False, rect=False)[0]
        boxes = result.boxes
        rows.append([{"label": result.names[int(c)], "score": float(s),
                      "box": [float(v) for v in xyxy]}
                     for xyxy, s, c in zip(boxes.xyxy.numpy(), boxes.conf.numpy(),
                                           boxes.cls.numpy(), strict=True)])
    return rows


def write_case(out: Path, name: str, onnx_file: Path, images: list[tuple[str, bytes]],
               image_dir: Path, case: dict) -> None:
    import ultralytics

    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "src").mkdir(parents=True)
    shutil.copy(onnx_file, folder / "src" / "model.onnx")
    squared: list[str] = []
    rows = references(folder / "src" / "model.onnx", image_dir, [n for n, _ in images], squared)
    pq.write_table(pa.table({"id": np.arange(len(images)), "name": [n for n, _ in images],
                             "image": [b for _, b in images]}), folder / "sample.parquet")
    pq.write_table(pa.table({"detections": pa.array(rows, DETECTION)}),
                   folder / "reference.parquet")
    (folder / "case.json").write_text(json.dumps(
        {"converter": "ultralytics (YOLO export to ONNX)",
         "versions": {"ultralytics": ultralytics.__version__}, "task": "detect", "atol": 1e-4,
         "box_atol": 1.0, "squared": squared, **case}, indent=2) + "\n")
    found = sum(len(r) for r in rows)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{name}: {found} detections in {len(rows)} images, {size / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "conformance" / "cases")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "detection")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    data = dataset(args.work / "shapes", 160)
    images = test_images(args.work / "test")
    yolo11 = train("yolo11.yaml", data, args.work, args.epochs)
    raw = Path(yolo11.export(format="onnx", imgsz=IMGSZ, dynamic=True, opset=17, simplify=True))
    write_case(args.out, "ultralytics_yolo_raw", raw, images, args.work / "test",
               {"trap": "raw [B, 4+nc, anchors], dynamic: letterboxed to a multiple of 32 "
                        "(640x480 runs as 128x96), cv2 bilinear, pad 114; class names a Python "
                        "dict literal in metadata_props; EXIF rotation, alpha dropped"})
    nms = Path(yolo11.export(format="onnx", imgsz=IMGSZ, nms=True, opset=17, simplify=True))
    write_case(args.out, "ultralytics_yolo_nms", nms, images, args.work / "test",
               {"trap": "nms=True, static batch 1: [1, 300, 6]; a full square letterbox; "
                        "runs at its export batch, as ultralytics runs it (batched, every "
                        "image after the first comes back empty)",
                "warnings": ["exported for that batch"]})
    yolo26 = train("yolo26.yaml", data, args.work, args.epochs)
    e2e = Path(yolo26.export(format="onnx", imgsz=IMGSZ, dynamic=True, opset=17, simplify=True,
                             nms=False))  # nms=False keeps the end-to-end head
    write_case(args.out, "ultralytics_yolo26_end2end", e2e, images, args.work / "test",
               {"trap": "end-to-end head (no NMS): [B, 300, 6] sorted by score, dynamic; its "
                        "TopK fails on inputs with fewer than 300 anchors (wide images)"})


if __name__ == "__main__":
    main()

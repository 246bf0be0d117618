"""What an ultralytics YOLO export is, read from what ultralytics writes into the ONNX file's
``metadata_props``: its task, class names (a Python dict literal, not JSON), export size,
stride, batch and the export's arguments (``nms``, ``dynamic``).

The output layout follows from the graph: ``[B, 4 + classes, anchors]`` is raw (NMS is the
task's); ``[B, max_det, 6]`` holds boxes the graph chose, by an ``nms=True`` export or an
end-to-end head. A dynamic export (a symbolic output batch dim, ultralytics' own test) runs
each image letterboxed to the stride rectangle; a static one at the full square. An
``nms=True`` graph runs at its export batch, as ultralytics runs it.
"""

from __future__ import annotations

import ast
from typing import Any

import onnx

from pipeline.errors import ModelError
from pipeline.models.onnx_types import Signature


def ultralytics_metadata(model: onnx.ModelProto) -> dict[str, str] | None:
    meta = {p.key: p.value for p in model.metadata_props}
    return meta if meta.get("author") == "Ultralytics" and "names" in meta else None


def _literal(meta: dict[str, str], key: str, where: str) -> Any:
    try:
        return ast.literal_eval(meta[key])
    except (KeyError, ValueError, SyntaxError) as exc:
        raise ModelError(f"{where}: ultralytics metadata {key!r} is missing or not a Python "
                         f"literal ({meta.get(key, '')[:80]!r})") from exc


def read_detector(meta: dict[str, str], graph: Signature, where: str) -> dict[str, Any]:
    """The bundle's detection section, labels and batch for an ultralytics export."""
    task = meta.get("task", "detect")
    if task != "detect":
        raise ModelError(f"{where}: an ultralytics {task} model; the detect task reads "
                         "detection models (task: detect)")
    names = _literal(meta, "names", where)
    if not isinstance(names, dict) or not names:
        raise ModelError(f"{where}: ultralytics metadata 'names' holds no class names")
    labels = [str(names[k]) for k in sorted(names, key=int)]
    imgsz = _literal(meta, "imgsz", where)
    imgsz = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(int(v) for v in imgsz)
    args = _literal(meta, "args", where) if "args" in meta else {}
    if len(graph.inputs) != 1 or len(graph.outputs) < 1:
        raise ModelError(f"{where}: a YOLO detector has one image input; this graph has "
                         f"{len(graph.inputs)}")
    out = graph.outputs[0]
    dims = out.dims or ()
    if len(dims) == 3 and dims[-1] == 6:
        layout = "yolo-nms" if args.get("nms") else "yolo-end2end"
    elif len(dims) == 3 and dims[1] == 4 + len(labels):
        layout = "yolo"
    else:
        raise ModelError(f"{where}: output {out.name} is {list(dims)}; a YOLO detector gives "
                         f"[batch, {4 + len(labels)}, anchors] or [batch, max_det, 6]")
    dynamic = isinstance(dims[0], str) if dims else False
    batch = int(meta.get("batch", "1") or 1)
    return {"layout": layout, "imgsz": imgsz, "stride": int(meta.get("stride", "32")),
            "rect": dynamic, "labels": labels, "output": out.name,
            "input": graph.inputs[0].name,
            "max_batch": batch if args.get("nms") or not dynamic else None}

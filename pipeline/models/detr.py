"""What a DETR-style detector exported by Optimum (``object-detection``) is: ``pixel_values``
in, ``logits [B, queries, classes + 1]`` (the last class is "no object") and ``pred_boxes
[B, queries, 4]`` out, class names in config.json's ``id2label``, pixels as
``preprocessor_config.json``'s ``DetrImageProcessor`` makes them.

Only the families whose ``post_process_object_detection`` is DETR's own (a softmax, the
no-object class dropped, every query above the threshold) are read as detectors; the others
(Deformable and Conditional DETR, RT-DETR: sigmoid scores and a top-k; YOLOS: sizes rounded
to a multiple of 16) are named and refused rather than read wrongly.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import ModelError
from pipeline.models.onnx_types import Signature

DETR_TYPES = ("detr", "table-transformer")
DETR_PROCESSORS = ("DetrImageProcessor", "DetrImageProcessorFast", "DetrFeatureExtractor")


def detr_outputs(graph: Signature) -> bool:
    """Outputs ``logits`` and ``pred_boxes``, both [batch, queries, ...]: a DETR-style head."""
    names = {o.name: o for o in graph.outputs}
    return all(n in names and names[n].dims is not None and len(names[n].dims) == 3
               for n in ("logits", "pred_boxes"))


def read_detr(config: dict[str, Any], processor: dict[str, Any], graph: Signature,
              where: str) -> list[str]:
    """The class names of a DETR export (refusing a family whose outputs mean otherwise)."""
    model_type = str(config.get("model_type") or "")
    if model_type not in DETR_TYPES:
        raise ModelError(f"{where}: a {model_type or 'DETR-like'} detector (outputs logits and "
                         "pred_boxes) whose post-processing is not DETR's softmax with a "
                         f"no-object class; detect reads {', '.join(DETR_TYPES)} exports (or "
                         "import it with --task tensor)")
    kind = str(processor.get("image_processor_type") or processor.get("feature_extractor_type")
               or "")
    if kind not in DETR_PROCESSORS:
        raise ModelError(f"{where}: preprocessor_config.json names {kind or 'no processor'}; "
                         f"a {model_type} detector's pixels are DetrImageProcessor's")
    mapping = config.get("id2label")
    if not isinstance(mapping, dict) or not mapping:
        raise ModelError(f"{where}: output logits has no class names (no id2label in "
                         "config.json)")
    labels = [str(mapping[k]) for k in sorted(mapping, key=int)]
    width = next(o for o in graph.outputs if o.name == "logits").dims[-1]
    if isinstance(width, int) and width != len(labels) + 1:
        raise ModelError(f"{where}: config.json id2label has {len(labels)} labels; output "
                         f"logits has {width} columns, expected {len(labels) + 1} (the last "
                         "is no object)")
    return labels

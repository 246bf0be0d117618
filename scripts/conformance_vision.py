"""Conformance cases of the vision task families beyond YOLO (dev-only, run by
make_conformance_models.py in the side environment):

- ``optimum_detr_detector``: a tiny DETR (transformers' ResNet backbone, no timm) trained
  briefly on synthetic shapes, exported by Optimum (``object-detection``: ``logits``,
  ``pred_boxes``), with what ``DetrImageProcessor`` and ``post_process_object_detection``
  give for each image, loaded as transformers' object-detection pipeline loads it.
- ``optimum_clip_zero_shot``: a tiny CLIP (both towers) trained briefly to match synthetic
  pictures to their captions, exported by Optimum (``zero-shot-image-classification``), with
  what ``transformers.pipeline("zero-shot-image-classification")`` returns.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DETECTION = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32()),
                                ("box", pa.list_(pa.float32(), 4))]))
SCENE_SIZES = [(128, 128), (160, 120), (120, 160), (200, 100)]


def detr_batches(processor: Any, steps: int, batch: int, seed: int):
    """(pixel_values, labels) batches of one scene size each (DETR normalises boxes to the
    padded input: one size a batch keeps them the image's own)."""
    import torch
    from make_detection_cases import draw_scene

    rng = random.Random(seed)
    for _ in range(steps):
        width, height = rng.choice(SCENE_SIZES)
        images, targets = [], []
        for _ in range(batch):
            image, boxes = draw_scene(rng, width, height)
            images.append(image)
            targets.append({"class_labels": torch.tensor([b[0] for b in boxes]),
                            "boxes": torch.tensor([b[1:] for b in boxes], dtype=torch.float32)})
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        yield pixels, targets


def detr_references(session: Any, processor: Any, classes: list[str], folder: Path,
                    names: list[str], threshold: float) -> tuple[list[list[dict]], float]:
    """post_process_object_detection of the ONNX model's outputs, image by image, on images
    loaded as the pipeline loads them (EXIF applied, RGB); highest score first. Also the
    smallest distance of any score from the threshold, and of a label from a tie."""
    import torch
    from transformers.image_utils import load_image
    from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

    rows, margin = [], 1.0
    for name in names:
        image = load_image(str(folder / name))
        pixels = processor(images=[image], return_tensors="np")["pixel_values"]
        logits, boxes = session.run(["logits", "pred_boxes"], {"pixel_values": pixels})
        probs = torch.softmax(torch.from_numpy(logits), -1)[..., :-1]
        top = probs.topk(2, -1).values
        margin = min(margin, float((probs.max(-1).values - threshold).abs().min()),
                     float((top[..., 0] - top[..., 1]).min()))
        found = processor.post_process_object_detection(
            DetrObjectDetectionOutput(logits=torch.from_numpy(logits),
                                      pred_boxes=torch.from_numpy(boxes)),
            threshold=threshold, target_sizes=[(image.height, image.width)])[0]
        labels = [classes[int(c)] for c in found["labels"]]
        row = [{"label": label, "score": float(s), "box": [float(v) for v in b]}
               for label, s, b in zip(labels, found["scores"], found["boxes"], strict=True)]
        rows.append(sorted(row, key=lambda d: -d["score"]))
    return rows, margin


def optimum_detr_detector(out: Path, fresh: Any, versions: Any) -> None:
    """DETR from Optimum: resize shortest_edge/longest_edge (PIL bilinear), ImageNet
    statistics, softmax with a no-object class, boxes as centre/size fractions."""
    import onnxruntime as ort
    import torch
    from make_detection_cases import CLASSES, test_images
    from optimum.exporters.onnx import main_export
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig, pipeline

    folder = fresh(out / "optimum_detr_detector")
    torch.manual_seed(31)
    labels = dict(enumerate(CLASSES))
    backbone = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 64],
                            depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone,
                        use_pretrained_backbone=False, d_model=64, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=8,
                        num_labels=len(labels), id2label=labels,
                        label2id={v: k for k, v in labels.items()}, auxiliary_loss=False)
    model = DetrForObjectDetection(config)
    processor = DetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 160})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    model.train()
    for step, (pixels, targets) in enumerate(detr_batches(processor, 5000, 8, 31)):
        loss = model(pixel_values=pixels, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if step % 500 == 0:
            print(f"detr step {step}: loss {loss.item():.3f}")
    model.eval()
    work = folder / "hf"
    model.save_pretrained(work)
    processor.save_pretrained(work)
    shutil.rmtree(folder / "src")
    main_export(str(work), output=str(folder / "src"), task="object-detection", opset=17)
    processor.save_pretrained(folder / "src")
    shutil.rmtree(work)
    images = test_images(folder / "images")
    names = [n for n, _ in images]
    session = ort.InferenceSession(str(folder / "src" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    references: dict[str, list] = {}
    margins = []
    for column, threshold in (("detections", 0.5), ("detections_low", 0.2)):
        references[column], margin = detr_references(session, processor, CLASSES,
                                                     folder / "images", names, threshold)
        margins.append(margin)
    oracle = pipeline("object-detection", model=model, image_processor=processor,
                      threshold=0.5)
    for name, row in zip(names, references["detections"], strict=True):
        found = oracle(str(folder / "images" / name))
        assert sorted((d["label"], round(d["score"], 4)) for d in found) == \
            sorted((d["label"], round(d["score"], 4)) for d in row), (name, found, row)
    shutil.rmtree(folder / "images")
    pq.write_table(pa.table({"id": np.arange(len(images)), "name": names,
                             "image": [b for _, b in images]}), folder / "sample.parquet")
    pq.write_table(pa.table({k: pa.array(v, DETECTION) for k, v in references.items()}),
                   folder / "reference.parquet")
    (folder / "case.json").write_text(json.dumps(
        {"converter": "Optimum (object-detection export)",
         "versions": versions("optimum", "transformers", "torch", "pillow"),
         "task": "detect", "atol": 1e-4, "box_atol": 1.0,
         "variants": {"detections_low": {"score_threshold": 0.2}},
         "trap": "DETR: shortest_edge/longest_edge resize with DETR's rounding, PIL bilinear, "
                 "no padding in a batch (no pixel_mask input: images of one size share a "
                 "batch); softmax with a no-object class; centre boxes scaled to the original "
                 "image, not clipped; threshold 0.5 (transformers' default)"},
        indent=2) + "\n")
    found = sum(len(r) for r in references["detections"])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder.name}: {found} detections in {len(names)} images (margin {min(margins):.2e}), "
          f"{size / 1e6:.2f} MB")


ZERO_SHOT_LABELS = ["box", "disc", "bar"]
CLIP_TEMPLATES = ["This is a photo of {}.", "a {} on noise", "{}"]


def clip_tokenizer(words: list[str]) -> Any:
    """A word-level CLIP-style tokenizer (lower case, start and end tokens, padded with the
    end token as CLIP's is) over the words the templates and labels use."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    special = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(special + sorted(set(words)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", model_max_length=16,
                                   model_input_names=["input_ids", "attention_mask"])


def clip_scene(rng: random.Random, kind: int, width: int, height: int) -> Any:
    """One shape of ``kind`` (a box, disc or bar as make_detection_cases draws them) on noise."""
    from PIL import Image, ImageDraw

    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(60, 200, (height, width, 3))
    image = Image.fromarray(noise.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    size = rng.uniform(0.35, 0.6) * min(width, height)
    w, h = (size, size) if kind < 2 else (size * 1.6, size * 0.45)
    x0, y0 = rng.uniform(0, max(1, width - w)), rng.uniform(0, max(1, height - h))
    color = [(220, 30, 30), (30, 200, 30), (30, 30, 220)][kind]
    shape = draw.ellipse if kind == 1 else draw.rectangle
    shape([x0, y0, x0 + w, y0 + h], fill=color)
    return image


def clip_test_images(rng: random.Random) -> tuple[list[bytes], list[str]]:
    """Shapes in JPEG, PNG and WebP of varied sizes, a grayscale, an RGBA and an EXIF-rotated
    one among them (the pipeline's load_image applies EXIF and converts to RGB)."""
    from PIL import Image

    specs = [(0, (64, 64), "PNG", "RGB", None), (1, (90, 60), "JPEG", "RGB", None),
             (2, (50, 120), "WEBP", "RGB", None), (0, (40, 40), "PNG", "L", None),
             (1, (70, 70), "PNG", "RGBA", None), (2, (120, 80), "JPEG", "RGB", 6),
             (0, (200, 150), "JPEG", "RGB", None), (1, (33, 47), "PNG", "RGB", None),
             (2, (64, 64), "PNG", "RGB", None), (1, (100, 100), "WEBP", "RGB", None)]
    data, names = [], []
    for i, (kind, size, fmt, mode, orientation) in enumerate(specs):
        image = clip_scene(rng, kind, *size).convert(mode)
        buffer = io.BytesIO()
        options: dict[str, Any] = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            options["exif"] = exif.tobytes()
        image.save(buffer, format=fmt, **options)
        data.append(buffer.getvalue())
        names.append(f"{i}-{mode}.{fmt.lower()}")
    return data, names


def optimum_clip_zero_shot(out: Path, fresh: Any, versions: Any) -> None:
    """CLIP with both towers from Optimum (zero-shot-image-classification): labels made into
    captions by the template, padded together, a softmax of logits_per_image over them."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        pipeline,
    )

    folder = fresh(out / "optimum_clip_zero_shot")
    torch.manual_seed(41)
    words = [w.strip(".").lower() for t in CLIP_TEMPLATES for w in t.format("").split()] + \
        ZERO_SHOT_LABELS + ["shape", "circle", "rectangle", "this", "is", "a", "photo", "of"]
    tokenizer = clip_tokenizer(words)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 40},
                                   crop_size={"height": 32, "width": 32})
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(41)
    model.train()
    for step in range(400):
        template = rng.choice(CLIP_TEMPLATES)
        captions = tokenizer([template.format(k) for k in ZERO_SHOT_LABELS], padding=True,
                             return_tensors="pt")
        kinds = [rng.randrange(3) for _ in range(16)]
        images = [clip_scene(rng, k, rng.randint(32, 96), rng.randint(32, 96)) for k in kinds]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        logits = model(**captions, pixel_values=pixels).logits_per_image
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(kinds))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"clip step {step}: loss {loss.item():.3f}")
    model.eval()
    work = folder / "hf"
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    processor.save_pretrained(work)
    shutil.rmtree(folder / "src")
    main_export(str(work), output=str(folder / "src"), task="zero-shot-image-classification",
                opset=17)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        if not (folder / "src" / name).exists():
            shutil.copy(work / name, folder / "src" / name)
    shutil.rmtree(work)
    images, names = clip_test_images(random.Random(43))
    oracle = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer,
                      image_processor=processor)
    settings = {"probabilities": (ZERO_SHOT_LABELS, CLIP_TEMPLATES[0]),
                "probabilities_template": (ZERO_SHOT_LABELS, "a {} on noise"),
                "probabilities_two": (["bar", "disc"], CLIP_TEMPLATES[0])}
    references: dict[str, Any] = {}
    from PIL import Image
    for column, (labels, template) in settings.items():
        rows = []
        for data in images:
            found = oracle(Image.open(io.BytesIO(data)), candidate_labels=labels,
                           hypothesis_template=template)
            by_label = {d["label"]: d["score"] for d in found}
            rows.append([by_label[label] for label in labels])
        references[column] = np.asarray(rows, np.float32)
        if column == "probabilities":
            references["label"] = np.asarray([labels[i] for i in references[column].argmax(1)])
            references["score"] = references[column].max(1)
    top = np.sort(references["probabilities"], axis=1)
    print(f"clip: labels {list(references['label'])}, smallest margin "
          f"{float((top[:, -1] - top[:, -2]).min()):.3f}")
    pq.write_table(pa.table({"id": np.arange(len(images)), "name": names, "image": images}),
                   folder / "sample.parquet")
    np.savez(folder / "reference.npz", **references)
    variants = {"probabilities_template": {"labels": ZERO_SHOT_LABELS,
                                           "template": "a {} on noise"},
                "probabilities_two": {"labels": ["bar", "disc"]}}
    (folder / "case.json").write_text(json.dumps(
        {"converter": "Optimum (zero-shot-image-classification export, CLIP)",
         "versions": versions("optimum", "transformers", "torch", "pillow"),
         "task": "zero-shot", "job_task": {"labels": ZERO_SHOT_LABELS}, "atol": 1e-4,
         "variants": variants,
         "trap": "CLIP with both towers in one graph: the captions (template 'This is a photo "
                 "of {}.') padded together with the end token, fed beside every image batch; "
                 "a softmax of logits_per_image over the labels; CLIP's bicubic resize and "
                 "centre crop; EXIF applied, as the pipeline loads images"},
        indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder.name}: {len(images)} images, {size / 1e6:.2f} MB")

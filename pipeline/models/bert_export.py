"""Export a Hugging Face BERT-family encoder to an ONNX bundle without PyTorch.

The graph is written op by op from the safetensors weights (numpy only): embeddings,
N encoder layers (self-attention honouring the attention mask, GELU feed-forward,
post-layer-norm) and optionally mean/CLS pooling with L2 normalization, so workers
fetch only [batch, hidden]. Batch and sequence axes are dynamic.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from pipeline.errors import ModelError
from pipeline.models.bundle import BundleSpec, EmbeddingSpec, TextSpec, write_bundle_spec
from pipeline.models.onnx_graph import GraphBuilder, float_output, int64_input
from pipeline.storage import sha256_file

Pooling = Literal["mean", "cls"]
ERF_GELU = ("gelu", "gelu_python")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ACTIVATIONS = (*ERF_GELU, *TANH_GELU, "relu")
MODEL_TYPES = ("bert",)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dict(cls, cfg: dict, where: str) -> BertConfig:
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ModelError(
                f"{where}: model_type {model_type!r} is not supported; "
                f"export-bert handles {', '.join(MODEL_TYPES)}"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(
                f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not "
                "supported; only 'absolute' is"
            )
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ModelError(
                f"{where}: hidden_act {act!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        try:
            conf = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                intermediate_size=int(cfg["intermediate_size"]),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
                type_vocab_size=int(cfg.get("type_vocab_size", 2)),
                layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
            )
        except KeyError as exc:
            raise ModelError(f"{where}: missing key {exc.args[0]}") from exc
        if conf.hidden_size % conf.num_attention_heads:
            raise ModelError(
                f"{where}: hidden_size {conf.hidden_size} is not a multiple of "
                f"num_attention_heads {conf.num_attention_heads}"
            )
        return conf


@dataclass(frozen=True)
class SentenceOptions:
    pooling: Pooling
    normalize: bool
    max_length: int


def resolve_source(src: str) -> Path:
    """A checkpoint directory, or an installed package that holds one."""
    path = Path(src)
    if path.is_dir():
        return _find_checkpoint(path, src)
    return _find_checkpoint(_package_root(src), src)


def _package_root(src: str) -> Path:
    spec = importlib.util.find_spec(src) if src.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{src}: neither a directory nor an installed Python package")
    return Path(next(iter(spec.submodule_search_locations)))


def _find_checkpoint(root: Path, src: str) -> Path:
    for config in sorted(root.rglob("config.json"), key=lambda p: len(p.parts)):
        if (config.parent / "model.safetensors").exists():
            return config.parent
    raise ModelError(f"{src}: no directory with config.json and model.safetensors found")


def sentence_options(ckpt: Path, cfg: BertConfig, tokenizer_cfg: dict) -> SentenceOptions:
    """Pooling, normalization and max length as sentence-transformers would use them."""
    pooling: Pooling = "mean"
    normalize = False
    modules_file = ckpt / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                pool_cfg = json.loads((ckpt / module["path"] / "config.json").read_text())
                if pool_cfg.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif not pool_cfg.get("pooling_mode_mean_tokens", True):
                    raise ModelError(f"{ckpt}: only mean or CLS pooling is supported")
    max_length = cfg.max_position_embeddings
    st_cfg = ckpt / "sentence_bert_config.json"
    if st_cfg.exists():
        max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", max_length))
    elif 0 < int(tokenizer_cfg.get("model_max_length", 0) or 0) < max_length:
        max_length = int(tokenizer_cfg["model_max_length"])
    return SentenceOptions(pooling, normalize, min(max_length, cfg.max_position_embeddings))


def checkpoint_files(ckpt: Path) -> list[str]:
    """The checkpoint files the export reads, relative to the checkpoint directory."""
    names = ["config.json", "model.safetensors", "tokenizer.json"]
    names += [n for n in ("tokenizer_config.json", "modules.json", "sentence_bert_config.json")
              if (ckpt / n).exists()]
    if (ckpt / "modules.json").exists():
        for module in json.loads((ckpt / "modules.json").read_text()):
            if module.get("type", "").endswith("Pooling"):
                names.append(f"{module['path']}/config.json")
    return names


def provenance(src: str, ckpt: Path) -> dict[str, Any]:
    """Where the checkpoint came from, by package and content, never by local path: the same
    checkpoint exported in two checkouts or machines must give the same bundle bytes."""
    source: dict[str, Any] = {}
    if not Path(src).is_dir():  # an installed package: its distribution name and version
        dists = importlib.metadata.packages_distributions().get(src) or [src]
        source["package"] = dists[0]
        try:
            source["version"] = importlib.metadata.version(dists[0])
        except importlib.metadata.PackageNotFoundError:
            source["version"] = None
        source["path"] = ckpt.relative_to(_package_root(src)).as_posix() or "."
    source["files"] = {name: sha256_file(str(ckpt / name)) for name in checkpoint_files(ckpt)}
    return source


def load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: cannot read weights ({exc})") from exc
    weights: dict[str, np.ndarray] = {}
    for name, array in raw.items():
        # Checkpoints from task heads prefix the encoder with "bert."; drop it.
        key = name.removeprefix("bert.").removeprefix("model.")
        weights[key] = array.astype(np.float32)
    return weights


class _BertGraph:
    def __init__(self, cfg: BertConfig, weights: dict[str, np.ndarray], where: str) -> None:
        # ``where`` names the checkpoint in error messages only, never in the model.
        self.cfg = cfg
        self.w = weights
        self.where = where
        self.g = GraphBuilder()

    def weight(self, key: str, transpose: bool = False) -> str:
        if key not in self.w:
            raise ModelError(f"{self.where}: weight {key!r} missing from model.safetensors")
        array = self.w[key]
        return self.g.const(np.ascontiguousarray(array.T if transpose else array), name=key)

    def linear(self, x: str, prefix: str) -> str:
        y = self.g.op("MatMul", [x, self.weight(f"{prefix}.weight", transpose=True)])
        return self.g.op("Add", [y, self.weight(f"{prefix}.bias")])

    def layer_norm(self, x: str, prefix: str) -> str:
        # Older checkpoints name the parameters gamma/beta.
        scale, bias = f"{prefix}.weight", f"{prefix}.bias"
        if scale not in self.w:
            scale, bias = f"{prefix}.gamma", f"{prefix}.beta"
        return self.g.op(
            "LayerNormalization",
            [x, self.weight(scale), self.weight(bias)],
            axis=-1,
            epsilon=self.cfg.layer_norm_eps,
        )

    def activation(self, x: str) -> str:
        g, act = self.g, self.cfg.hidden_act
        if act == "relu":
            return g.op("Relu", [x])
        if act in ERF_GELU:
            erf = g.op("Erf", [g.op("Div", [x, g.const(math.sqrt(2.0), dtype=np.float32)])])
            inner = g.op("Add", [erf, g.const(1.0, dtype=np.float32)])
        else:
            cube = g.op("Mul", [g.op("Pow", [x, g.const(3.0, dtype=np.float32)]),
                                g.const(0.044715, dtype=np.float32)])
            scaled = g.op("Mul", [g.op("Add", [x, cube]),
                                  g.const(math.sqrt(2.0 / math.pi), dtype=np.float32)])
            inner = g.op("Add", [g.op("Tanh", [scaled]), g.const(1.0, dtype=np.float32)])
        return g.op("Mul", [g.op("Mul", [x, inner]), g.const(0.5, dtype=np.float32)])

    def embeddings(self) -> str:
        g = self.g
        words = g.op("Gather", [self.weight("embeddings.word_embeddings.weight"), "input_ids"])
        seq_len = g.op("Squeeze", [g.op("Shape", ["input_ids"], start=1, end=2)])
        positions = g.op("Range", [g.const(0, dtype=np.int64), seq_len, g.const(1, dtype=np.int64)])
        pos = g.op("Gather", [self.weight("embeddings.position_embeddings.weight"), positions])
        types = g.op(
            "Gather", [self.weight("embeddings.token_type_embeddings.weight"), "token_type_ids"]
        )
        summed = g.op("Add", [g.op("Add", [words, pos]), types])
        return self.layer_norm(summed, "embeddings.LayerNorm")

    def attention_bias(self, mask_float: str) -> str:
        # [B, S] -> [B, 1, 1, S]: 0 where attended, a very negative number at padding.
        g = self.g
        expanded = g.op("Unsqueeze", [mask_float, g.const([1, 2], dtype=np.int64)])
        inverted = g.op("Sub", [g.const(1.0, dtype=np.float32), expanded])
        return g.op("Mul", [inverted, g.const(np.finfo(np.float32).min, dtype=np.float32)])

    def self_attention(self, x: str, bias: str, prefix: str) -> str:
        g, cfg = self.g, self.cfg
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        split = g.const([0, 0, heads, head_dim], dtype=np.int64)

        def project(name: str, perm: list[int]) -> str:
            y = self.linear(x, f"{prefix}.attention.self.{name}")
            return g.op("Transpose", [g.op("Reshape", [y, split])], perm=perm)

        q = project("query", [0, 2, 1, 3])
        k = project("key", [0, 2, 3, 1])
        v = project("value", [0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [q, k]),
                              g.const(1.0 / math.sqrt(head_dim), dtype=np.float32)])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        merged = g.op("Reshape", [ctx, g.const([0, 0, cfg.hidden_size], dtype=np.int64)])
        out = self.linear(merged, f"{prefix}.attention.output.dense")
        return self.layer_norm(g.op("Add", [out, x]), f"{prefix}.attention.output.LayerNorm")

    def feed_forward(self, x: str, prefix: str) -> str:
        hidden = self.activation(self.linear(x, f"{prefix}.intermediate.dense"))
        out = self.linear(hidden, f"{prefix}.output.dense")
        return self.layer_norm(self.g.op("Add", [out, x]), f"{prefix}.output.LayerNorm")

    def pool(self, x: str, mask_float: str, opts: SentenceOptions) -> str:
        g = self.g
        if opts.pooling == "cls":
            pooled = g.op("Gather", [x, g.const(0, dtype=np.int64)], axis=1)
        else:
            mask3 = g.op("Unsqueeze", [mask_float, g.const([2], dtype=np.int64)])
            axis1 = g.const([1], dtype=np.int64)
            summed = g.op("ReduceSum", [g.op("Mul", [x, mask3]), axis1], keepdims=0)
            counts = g.op("ReduceSum", [mask3, axis1], keepdims=0)
            counts = g.op("Max", [counts, g.const(1e-9, dtype=np.float32)])
            pooled = g.op("Div", [summed, counts])
        if not opts.normalize:
            return g.op("Identity", [pooled], name="sentence_embedding")
        # ReduceL2 still takes axes as an attribute at opset 17 (ReduceSum moved them to inputs).
        norm = g.op("ReduceL2", [pooled], axes=[1], keepdims=1)
        norm = g.op("Max", [norm, g.const(1e-12, dtype=np.float32)])
        return g.op("Div", [pooled, norm], name="sentence_embedding")

    def build(self, opts: SentenceOptions, pool_in_graph: bool, doc: str) -> onnx.ModelProto:
        g = self.g
        mask_float = g.op("Cast", ["attention_mask"], to=onnx.TensorProto.FLOAT)
        bias = self.attention_bias(mask_float)
        x = self.embeddings()
        for i in range(self.cfg.num_hidden_layers):
            prefix = f"encoder.layer.{i}"
            x = self.feed_forward(self.self_attention(x, bias, prefix), prefix)
        inputs = [int64_input(n, ["batch", "sequence"])
                  for n in ("input_ids", "attention_mask", "token_type_ids")]
        hidden = self.cfg.hidden_size
        if pool_in_graph:
            self.pool(x, mask_float, opts)
            outputs = [float_output("sentence_embedding", ["batch", hidden])]
        else:
            g.op("Identity", [x], name="last_hidden_state")
            outputs = [float_output("last_hidden_state", ["batch", "sequence", hidden])]
        return g.model(inputs, outputs, "bert_encoder", doc=doc)


def export_bert(
    src: str,
    out: Path,
    pool_in_graph: bool = True,
    pooling: Pooling | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
) -> BundleSpec:
    """Convert the checkpoint at ``src`` into a bundle directory ``out``."""
    ckpt = resolve_source(src)
    cfg = BertConfig.from_dict(json.loads((ckpt / "config.json").read_text()), str(ckpt))
    tokenizer_file = ckpt / "tokenizer.json"
    if not tokenizer_file.exists():
        raise ModelError(f"{ckpt}: tokenizer.json not found (a fast tokenizer is required)")
    opts = _options(ckpt, cfg, pooling, normalize, max_length)
    source = provenance(src, ckpt)
    model = _BertGraph(cfg, load_weights(ckpt / "model.safetensors"), str(ckpt)).build(
        opts, pool_in_graph, _model_doc(source)
    )
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / "model.onnx"))
    _write_tokenizer(tokenizer_file, out / "tokenizer.json")

    spec = BundleSpec(
        task="embed",
        sha256=sha256_file(str(out / "model.onnx")),
        inputs={
            "input_ids": "tokens.ids",
            "attention_mask": "tokens.attention_mask",
            "token_type_ids": "tokens.type_ids",
        },
        outputs={"embedding": "sentence_embedding" if pool_in_graph else "last_hidden_state"},
        text=TextSpec(max_length=opts.max_length),
        embedding=EmbeddingSpec(
            pooling="in_graph" if pool_in_graph else opts.pooling,
            normalize=opts.normalize,
            dim=cfg.hidden_size,
        ),
        source={"exporter": "export-bert", **source, "config": asdict(cfg)},
    )
    write_bundle_spec(out, spec)
    return spec


def _options(ckpt: Path, cfg: BertConfig, pooling: Pooling | None, normalize: bool | None,
             max_length: int | None) -> SentenceOptions:
    """Pooling, normalization and max length: as asked, else as the checkpoint says."""
    tok_cfg_file = ckpt / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.exists() else {}
    detected = sentence_options(ckpt, cfg, tok_cfg)
    opts = SentenceOptions(
        pooling=pooling or detected.pooling,
        normalize=detected.normalize if normalize is None else normalize,
        max_length=max_length or detected.max_length,
    )
    if opts.max_length > cfg.max_position_embeddings:
        raise ModelError(
            f"--max-length {opts.max_length} exceeds max_position_embeddings "
            f"{cfg.max_position_embeddings} of {ckpt}"
        )
    return opts


def _model_doc(source: dict[str, Any]) -> str:
    # Content only: a new release of the same weights must not change the model's bytes.
    return ("BERT encoder exported by export-bert from model.safetensors sha256 "
            + source["files"]["model.safetensors"])


def _write_tokenizer(src: Path, dst: Path) -> None:
    # Padding and truncation are set by the task at run time, never by the file.
    data = json.loads(src.read_text(encoding="utf-8"))
    if data.get("padding") is None and data.get("truncation") is None:
        shutil.copyfile(src, dst)
        return
    data["padding"] = None
    data["truncation"] = None
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

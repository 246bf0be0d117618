"""What a converter's model means: its task, what feeds each graph input, what each output is.

Read from the graph and the configs beside it, never from a file a user wrote. Every value
says where it came from (``Finding``), so ``bundle.yaml`` and the import command can show it.
Where two readings are possible, ``ModelError`` names the choices and the flag that picks one.

- Inputs: tokens by name (``input_ids``, ``attention_mask``, ``token_type_ids``); the one
  numeric [N, F] input of a tabular classifier (an ONNX-ML classifier node or a ZipMap in the
  graph) is its features; any other input is a column of its name.
- Images: ``pixel_values`` (or the one 4-D float input beside a ``preprocessor_config.json``)
  is fed by ``image.pixels``, preprocessed as that file says (``image_processor``); ``logits``
  with ``id2label`` make an image classifier, ``image_embeds``/``pooler_output``/``embeddings``
  (or pooled ``last_hidden_state``) an image embedder.
- A cross-encoder: token inputs, one logit, a tokenizer with a pair template: ``rerank``,
  scored with the activation sentence-transformers' config names (sigmoid or none).
- Outputs: ``sentence_embedding`` is an embedding; token embeddings (``last_hidden_state``,
  ``token_embeddings``) are pooled as the sentence-transformers config says (``1_Pooling``,
  ``Normalize`` in modules.json), or as ``--pooling`` says; ``logits`` with ``id2label`` a text
  classifier; an ONNX-ML classifier's label and probabilities a tabular one.
- The max length: sentence_bert_config.json's ``max_seq_length``, else tokenizer_config.json's
  ``model_max_length``, else config.json's ``max_position_embeddings``; never tokenizer.json's
  own truncation (sentence-transformers writes 128 there for a model that takes 256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import onnx
from tokenizers import Tokenizer

from pipeline.errors import ModelError
from pipeline.models.bundle import GENERATION_SOURCE, IMAGE_SOURCE, LETTERBOX_SOURCE, TEXT_SOURCE
from pipeline.models.detection import read_detector, ultralytics_metadata
from pipeline.models.detr import detr_outputs, read_detr
from pipeline.models.generation import cache_inputs, read_causal, read_genai
from pipeline.models.image_processor import image_section
from pipeline.models.onnx_types import Signature, TensorInfo
from pipeline.models.repairs import ZipMapRemoved, classifier_labels
from pipeline.models.sources import ModelSource

TOKEN_INPUTS = {"input_ids": "tokens.ids", "attention_mask": "tokens.attention_mask",
                "token_type_ids": "tokens.type_ids"}
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
IMAGE_EMBEDDINGS = ("image_embeds", "pooler_output", "embeddings", "embedding")
TASKS = ("embed", "classify", "rerank", "token-classify", "sparse-embed", "detect", "zero-shot",
         "generate", "tensor")
PREPROCESSOR = "preprocessor_config.json"
HUGE_MAX_LENGTH = 1_000_000  # tokenizer_config.json's "no limit" is 1e30


@dataclass(frozen=True)
class Finding:
    key: str  # the bundle.yaml key
    value: Any
    source: str  # where it came from


@dataclass
class Reading:
    """The bundle.yaml fields inferred for a model, and where each came from."""

    task: str = "tensor"
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    text: dict[str, Any] | None = None  # {tokenizer, max_length}
    embedding: dict[str, Any] | None = None  # {pooling, normalize, dim}
    features: list[str] | None = None
    feature_count: int | None = None
    labels: list[str] | None = None
    image: dict[str, Any] | None = None  # the bundle's image section
    rerank: dict[str, Any] | None = None  # {activation}
    sparse: dict[str, Any] | None = None  # {pooling, activation, dim}: SPLADE
    detection: dict[str, Any] | None = None  # {layout, imgsz, stride, rect}: YOLO
    generation: dict[str, Any] | None = None  # a causal LM's loop (bundle GenerationSpec)
    max_batch: int | None = None  # rows per call the export allows (an nms=True graph)
    findings: list[Finding] = field(default_factory=list)

    def note(self, key: str, value: Any, source: str) -> None:
        self.findings.append(Finding(key, value, source))


@dataclass(frozen=True)
class Choices:
    """What the user decided: a task, a pooling, feature names (None: infer)."""

    task: str = "auto"
    pooling: str | None = None
    features: list[str] | None = None
    activation: str | None = None  # a one-logit reranker's score: identity or sigmoid
    model_file: str | None = None  # the .onnx file of a folder holding several


def interpret(source: ModelSource, model: onnx.ModelProto, graph: Signature,
              zipmap: ZipMapRemoved | None, choices: Choices) -> Reading:
    reading = Reading()
    if _generation(source, graph, reading, choices.task):
        return reading
    meta = ultralytics_metadata(model)
    if meta is not None and (choices.task == "detect" or
                             (choices.task == "auto" and meta.get("task", "detect") == "detect")):
        _detector(source, graph, meta, reading, choices.task)
        return reading
    if source.others:
        reading.note("model_file", source.model.name,
                     f"of the .onnx files in the folder ({', '.join(source.others)} too); "
                     "--model-file picks another")
    tabular = zipmap is not None or any(
        n.domain == "ai.onnx.ml" and n.op_type.endswith("Classifier") for n in model.graph.node)
    _inputs(source, graph, choices, reading, tabular)
    tokens = any(s.startswith("tokens.") for s in reading.inputs.values())
    if tokens:
        _text(source, reading)
        _check_vocabulary(source, model)
    pixels = next((graph.input(n) for n, s in reading.inputs.items() if s == IMAGE_SOURCE), None)
    if pixels is not None:
        task = _pixel_task(source, graph, pixels, choices, reading, tokens)
    else:
        task = _task(source, model, graph, zipmap, choices, reading, tokens)
    reading.task = task
    if task == "tensor":
        for out in graph.outputs:
            if out.kind != "tensor":
                raise ModelError(f"{source.uri}: output {out.name} is a {out.kind}, not a "
                                 "tensor; the tensor task writes tensors only")
            reading.outputs[out.name] = out.name
        reading.note("outputs", list(reading.outputs), "every graph output, by its name")
        if tokens:
            raise ModelError(f"{source.uri}: token inputs need --task embed or classify; the "
                             "tensor task reads columns named after the graph inputs")
    return reading


def _pixel_task(source: ModelSource, graph: Signature, pixels: TensorInfo, choices: Choices,
                reading: Reading, tokens: bool) -> str:
    """A model fed images: a DETR detector, CLIP (images and captions), or an image
    classifier or embedder, with pixels as its preprocessor_config.json says."""
    config = source.json(PREPROCESSOR)
    if config is None:
        raise ModelError(f"{source.uri}: input {pixels.name} takes images and no "
                         f"{PREPROCESSOR} says how to make its pixels; save the model's "
                         "image processor beside it (processor.save_pretrained)")
    if detr_outputs(graph) and choices.task in ("auto", "detect"):
        return _detr(source, graph, pixels, config, reading, choices.task)
    if tokens and any(o.name == "logits_per_image" for o in graph.outputs) and \
            choices.task in ("auto", "zero-shot"):
        return _image_text(source, pixels, config, reading, choices.task)
    reading.image = image_section(config, pixels, f"{source.uri}/{PREPROCESSOR}", reading.note)
    return _image_task(source, graph, choices, reading)


GENERATION_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _generation(source: ModelSource, graph: Signature, reading: Reading, wanted: str) -> bool:
    """A causal LM with its KV cache is a ``generate`` model; one without a cache scores
    nothing in one forward pass: say so in one line, not that its logits lack labels."""
    cache = cache_inputs(graph)
    config = source.json("config.json") or {}
    architectures = config.get("architectures") or []
    lm = [a for a in architectures if isinstance(a, str) and a.endswith(GENERATION_ARCHITECTURES)]
    if (cache or source.layout == "genai") and wanted in ("auto", "generate"):
        _generation_reading(source, graph, config, cache, reading, wanted)
        return True
    if cache:
        raise ModelError(f"{source.where}: a text generation model (a causal LM with a KV "
                         f"cache: inputs {cache[0]} and {len(cache) - 1} more); --task "
                         f"{wanted} does not fit it (--task generate)")
    logits = next((o for o in graph.outputs if o.name == "logits"), None)
    if lm and logits is not None and logits.dims is not None and len(logits.dims) == 3:
        raise ModelError(f"{source.where}: a text generation model ({lm[0]} in config.json) "
                         "exported without its KV cache; export it with one (Optimum: --task "
                         "text-generation-with-past) to run it as a generate model")
    return False


def _generation_reading(source: ModelSource, graph: Signature, config: dict[str, Any],
                        cache: list[str], reading: Reading, wanted: str) -> None:
    """The generate reading: tokens in, the loop's state, the generation section and where
    each value came from."""
    if "tokenizer.json" not in source.configs:
        raise ModelError(f"{source.uri}: a text generation model (a causal LM with a KV "
                         "cache) and no tokenizer.json lies beside it (save the tokenizer "
                         "with the model)")
    vocabulary = Tokenizer.from_file(str(source.configs["tokenizer.json"])).get_vocab()
    tokenizer_config = {**(source.json("special_tokens_map.json") or {}),
                        **(source.json("tokenizer_config.json") or {})}
    if "chat_template.jinja" in source.configs:  # where transformers 4.5x saves it
        tokenizer_config["chat_template"] = source.configs["chat_template.jinja"].read_text()
    reading.generation = read_genai(source.json("genai_config.json") or {},
                                    tokenizer_config, vocabulary, source.where) \
        if source.layout == "genai" else \
        read_causal(config, source.json("generation_config.json") or {},
                    tokenizer_config, vocabulary, graph, source.where)
    for info in graph.inputs:
        role = TOKEN_INPUTS.get(info.name, GENERATION_SOURCE)
        reading.inputs[info.name] = role
    reading.outputs = {"logits": "logits"}
    reading.text = {"tokenizer": "tokenizer.json",
                    "max_length": reading.generation["max_context"]}
    reading.task = "generate"
    where = "genai_config.json" if source.layout == "genai" else \
        "generation_config.json or config.json"
    reading.note("inputs", f"input_ids, attention_mask; {len(cache)} cache inputs fed by "
                 "the generation loop", "graph input names")
    reading.note("generation.eos_token_ids", reading.generation["eos_token_ids"],
                 f"{where} eos_token_id")
    reading.note("generation.pad_token_id", reading.generation["pad_token_id"],
                 f"{where} pad_token_id, else the tokenizer's pad_token, else eos")
    reading.note("generation.max_context", reading.generation["max_context"],
                 "config.json max_position_embeddings")
    if reading.generation["chat_template"]:
        reading.note("generation.chat_template", "a chat template",
                     "chat_template.jinja" if "chat_template.jinja" in source.configs
                     else "tokenizer_config.json chat_template")
    reading.note("generation.runtime", reading.generation["runtime"],
                 "genai_config.json beside the model (onnxruntime-genai runs it)"
                 if source.layout == "genai" else
                 "the graph's past_key_values inputs (the pipeline's loop runs it)")
    reading.note("task", "generate", "--task" if wanted == "generate" else
                 "an onnxruntime-genai model folder" if source.layout == "genai" else
                 f"a causal LM with a KV cache ({cache[0]} and {len(cache) - 1} more)")


def _detector(source: ModelSource, graph: Signature, meta: dict[str, str], reading: Reading,
              wanted: str) -> None:
    found = read_detector(meta, graph, source.where)
    reading.task = "detect"
    reading.inputs = {found["input"]: LETTERBOX_SOURCE}
    reading.outputs = {"detections": found["output"]}
    reading.labels = found["labels"]
    reading.detection = {k: found[k] for k in ("layout", "imgsz", "stride", "rect")}
    reading.max_batch = found["max_batch"]
    where = "ultralytics metadata_props"
    reading.note(f"inputs.{found['input']}", LETTERBOX_SOURCE, f"{where} (a YOLO export)")
    reading.note("labels", found["labels"], f"{where} names")
    reading.note("detection.layout", found["layout"],
                 f"output {found['output']} shape{' and args nms' if 'nms' in found['layout'] else ''}")
    reading.note("detection.imgsz", list(found["imgsz"]), f"{where} imgsz")
    reading.note("detection.rect", found["rect"], "output batch dim symbolic (a dynamic "
                 "export: letterboxed to the stride rectangle)" if found["rect"] else
                 "a static export: letterboxed to the full square")
    if found["max_batch"]:
        reading.note("max_batch", found["max_batch"], f"{where} batch (a static or nms=True "
                     "graph runs at its export batch, as ultralytics runs it)")
    reading.note("task", "detect", "--task" if wanted == "detect" else
                 f"{where} task detect")


def _image_text(source: ModelSource, pixels: TensorInfo, config: dict[str, Any],
                reading: Reading, wanted: str) -> str:
    """CLIP with both towers (Optimum's zero-shot-image-classification export): images scored
    against captions a job makes from its labels."""
    model_type = (source.json("config.json") or {}).get("model_type")
    if model_type != "clip":
        raise ModelError(f"{source.where}: a {model_type or 'two-tower'} image-text model "
                         "(output logits_per_image); zero-shot reads CLIP, whose scores are a "
                         "softmax over the labels (SigLIP's are sigmoids of captions padded "
                         "to 64 tokens); import it with --task tensor")
    reading.image = image_section(config, pixels, f"{source.uri}/{PREPROCESSOR}", reading.note)
    reading.outputs = {"logits": "logits_per_image"}
    reading.note("outputs.logits", "logits_per_image", "graph output name")
    reading.note("task", "zero-shot", "--task" if wanted == "zero-shot" else
                 "image and token inputs, output logits_per_image of a clip model (a job "
                 "names the labels)")
    return "zero-shot"


def _detr(source: ModelSource, graph: Signature, pixels: TensorInfo, config: dict[str, Any],
          reading: Reading, wanted: str) -> str:
    """A DETR-style detector: its pixels as its processor makes them, at any size."""
    reading.labels = read_detr(source.json("config.json") or {}, config, graph, source.where)
    reading.image = image_section(config, pixels, f"{source.uri}/{PREPROCESSOR}", reading.note,
                                  any_size=True)
    reading.outputs = {"logits": "logits", "boxes": "pred_boxes"}
    reading.detection = {"layout": "detr"}
    reading.note("labels", reading.labels, "config.json id2label (logits has one more: no "
                 "object)")
    reading.note("detection.layout", "detr", "outputs logits and pred_boxes [batch, queries, "
                 f"...] of a {(source.json('config.json') or {}).get('model_type')} model")
    reading.note("task", "detect", "--task" if wanted == "detect" else
                 "image input, outputs logits and pred_boxes")
    return "detect"


def _inputs(source: ModelSource, graph: Signature, choices: Choices, reading: Reading,
            tabular: bool) -> None:
    """Token inputs by name; the features of a tabular classifier (an ONNX-ML classifier or
    ZipMap in the graph, or --task classify); any other input a column of its name."""
    numeric = [i for i in graph.inputs if i.name not in TOKEN_INPUTS and i.kind == "tensor"
               and i.dims is not None and len(i.dims) == 2
               and i.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]
    wants = choices.task == "classify" or (choices.task == "auto" and tabular)
    features = numeric[0] if len(numeric) == 1 and len(graph.inputs) == 1 and wants else None
    only = graph.inputs[0] if len(graph.inputs) == 1 else None
    raw_text = only if wants and only is not None and only.kind == "tensor" and \
        only.elem_type == onnx.TensorProto.STRING and only.dims is not None and \
        (len(only.dims) == 1 or (len(only.dims) == 2 and only.dims[1] == 1)) else None
    images = [i for i in graph.inputs if i.kind == "tensor" and i.dims is not None
              and len(i.dims) == 4 and i.elem_type in (onnx.TensorProto.FLOAT,
                                                       onnx.TensorProto.FLOAT16)]
    pixels = next((i for i in images if i.name == "pixel_values"), None) or \
        (images[0] if len(images) == 1 and len(graph.inputs) == 1 and PREPROCESSOR in
         source.configs and choices.task != "tensor" else None)
    for info in graph.inputs:
        if info.name in TOKEN_INPUTS:
            reading.inputs[info.name] = TOKEN_INPUTS[info.name]
            reading.note(f"inputs.{info.name}", TOKEN_INPUTS[info.name], "graph input name")
        elif info is pixels and choices.task != "tensor":
            reading.inputs[info.name] = IMAGE_SOURCE
            reading.note(f"inputs.{info.name}", IMAGE_SOURCE,
                         "graph input name" if info.name == "pixel_values" else
                         f"the only graph input, 4-D, beside {PREPROCESSOR}")
        elif info is raw_text:
            reading.inputs[info.name] = TEXT_SOURCE
            reading.note(f"inputs.{info.name}", TEXT_SOURCE,
                         f"the only graph input, strings {_shape(info)} of a classifier (a "
                         "text column, one string a row)")
        elif info is features:
            reading.inputs[info.name] = "features"
            reading.note(f"inputs.{info.name}", "features",
                         f"the only graph input, one [N, F] {info.type_name} tensor")
            _feature_names(source, info, choices, reading)
        else:
            reading.inputs[info.name] = f"column:{info.name}"
            reading.note(f"inputs.{info.name}", f"column:{info.name}", "graph input name")


def _feature_names(source: ModelSource, info: TensorInfo, choices: Choices,
                   reading: Reading) -> None:
    width = info.dims[1] if info.dims and isinstance(info.dims[1], int) else None
    if choices.features:
        if width is not None and len(choices.features) != width:
            raise ModelError(f"--features: {len(choices.features)} names given, input "
                             f"{info.name} takes {width}")
        reading.features = list(choices.features)
        reading.note("features", f"{len(choices.features)} names", "--features")
    elif width is not None:
        reading.feature_count = width
        reading.note("feature_count", width,
                     f"dim 1 of input {info.name} (no feature names: a job reads the input's "
                     "columns other than passthrough, in file order)")
    else:
        raise ModelError(f"{source.uri}: input {info.name} takes features of an unknown "
                         "count; name them with --features a,b,c")


def _text(source: ModelSource, reading: Reading) -> None:
    if "tokenizer.json" not in source.configs:
        raise ModelError(f"{source.uri}: the model takes token ids and no tokenizer.json lies "
                         "beside it (a fast tokenizer is needed; save it with the model)")
    limit, where = _max_length(source)
    reading.text = {"tokenizer": "tokenizer.json", "max_length": limit}
    reading.note("text.max_length", limit, where)


def _check_vocabulary(source: ModelSource, model: onnx.ModelProto) -> None:
    """The tokenizer's ids must fit the model's word embeddings (the table input_ids index)."""
    tables = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.input[0] not in tables:
            continue
        index, steps = node.input[1], 0
        while index in producers and producers[index].op_type in ("Cast", "Identity") and steps < 3:
            index, steps = producers[index].input[0], steps + 1
        if index != "input_ids":
            continue
        rows = tables[node.input[0]].dims[0]
        vocabulary = Tokenizer.from_file(str(source.configs["tokenizer.json"])).get_vocab_size()
        if vocabulary > rows:
            raise ModelError(f"{source.uri}: tokenizer.json has {vocabulary} tokens, the model's "
                             f"word embeddings ({node.input[0]}) {rows}: the tokenizer belongs to "
                             "another model")
        return


def _max_length(source: ModelSource) -> tuple[int, str]:
    config = source.json("config.json") or {}
    positions = config.get("max_position_embeddings")
    for name, key in (("sentence_bert_config.json", "max_seq_length"),
                      ("tokenizer_config.json", "model_max_length")):
        value = (source.json(name) or {}).get(key)
        if isinstance(value, (int, float)) and 1 < value < HUGE_MAX_LENGTH:
            if positions and value > positions:
                return int(positions), f"config.json max_position_embeddings ({name} says {value})"
            return int(value), f"{name} {key}"
    if isinstance(positions, int) and positions > 1:
        return positions, "config.json max_position_embeddings"
    raise ModelError(f"{source.uri}: no max length in sentence_bert_config.json, "
                     "tokenizer_config.json or config.json")


def _task(source: ModelSource, model: onnx.ModelProto, graph: Signature,
          zipmap: ZipMapRemoved | None, choices: Choices, reading: Reading, tokens: bool) -> str:
    outputs = {o.name: o for o in graph.outputs}
    wanted = choices.task
    if wanted not in ("auto", *TASKS):
        raise ModelError(f"--task {wanted}: use auto, {', '.join(TASKS)}")
    if wanted == "tensor":
        reading.note("task", "tensor", "--task")
        return "tensor"
    if tokens:
        return _token_task(source, outputs, choices, reading)
    if {"features", TEXT_SOURCE} & set(reading.inputs.values()) and \
            wanted in ("auto", "classify") and \
            _tabular_classifier(model, outputs, zipmap, reading):
        reading.note("task", "classify", "--task" if wanted == "classify" else
                     ("text" if TEXT_SOURCE in reading.inputs.values() else "features")
                     + " in; label and probabilities out")
        return "classify"
    if wanted not in ("auto", "tensor"):
        raise ModelError(f"{source.uri}: --task {wanted} does not fit this graph (inputs: "
                         f"{', '.join(i.name for i in graph.inputs)}; outputs: "
                         f"{', '.join(outputs)}); try --task tensor")
    reading.note("task", "tensor", "no token or feature inputs with embedding or class outputs")
    return "tensor"


def _token_task(source: ModelSource, outputs: dict[str, TensorInfo], choices: Choices,
                reading: Reading) -> str:
    """A model fed tokens: an embedder, SPLADE, a token, sequence or pair classifier."""
    wanted = choices.task
    embedding = _embedding(source, outputs, choices, reading) \
        if wanted in ("auto", "embed") else None
    if embedding:
        reading.note("task", "embed", "--task" if wanted == "embed" else
                     f"token inputs, output {reading.outputs['embedding']}")
        return "embed"
    logits = outputs.get("logits")
    per_token = logits is not None and logits.dims is not None and len(logits.dims) == 3
    if per_token and _sparse(source, logits, choices, reading):
        return "sparse-embed"
    if per_token and wanted in ("auto", "token-classify"):
        reading.outputs["logits"] = "logits"
        reading.labels = _id2label(source, logits)
        reading.note("outputs.logits", "logits", "graph output name")
        reading.note("labels", reading.labels, "config.json id2label")
        reading.note("task", "token-classify", "--task" if wanted == "token-classify" else
                     "token inputs, output logits [batch, tokens, labels]")
        return "token-classify"
    if per_token and wanted in ("classify", "rerank"):
        raise ModelError(f"{source.uri}: output logits is {_shape(logits)}, one score per "
                         f"token: --task {wanted} needs [batch, labels]; this is a token "
                         "classifier (--task token-classify)")
    if "logits" in outputs and wanted in ("auto", "rerank") and \
            _cross_encoder(source, outputs["logits"], reading, choices):
        return "rerank"
    if "logits" in outputs and wanted in ("auto", "classify"):
        if logits.dims is not None and len(logits.dims) != 2:
            raise ModelError(f"{source.uri}: output logits is {_shape(logits)}; classify "
                             "needs [batch, labels]")
        reading.outputs["logits"] = "logits"
        reading.labels = _id2label(source, outputs["logits"])
        reading.note("labels", reading.labels, "config.json id2label")
        reading.note("task", "classify", "--task" if wanted == "classify" else
                     "token inputs, output logits")
        return "classify"
    if wanted != "auto":
        raise ModelError(f"{source.uri}: --task {wanted} needs an output "
                         f"{'sentence_embedding or last_hidden_state' if wanted == 'embed' else 'logits'}"
                         f" (outputs: {', '.join(outputs)})")
    return "tensor"


def _splade_config(source: ModelSource) -> tuple[dict[str, Any], str] | None:
    """SpladePooling's config, when modules.json lists one."""
    modules = source.configs.get("modules.json")
    entries = json.loads(modules.read_text()) if modules else []
    for entry in entries:
        if str(entry.get("type", "")).endswith("SpladePooling"):
            name = f"{entry.get('path') or '1_SpladePooling'}/config.json"
            return source.json(name) or {}, name
    return None


def _sparse(source: ModelSource, logits: TensorInfo, choices: Choices,
            reading: Reading) -> bool:
    """SPLADE: MLM logits over the vocabulary, pooled as SpladePooling's config says (or as
    --pooling max|sum says for a plain fill-mask export given --task sparse-embed)."""
    wanted = choices.task
    found = _splade_config(source)
    architectures = (source.json("config.json") or {}).get("architectures") or []
    masked_lm = any(str(a).endswith("ForMaskedLM") for a in architectures)
    if found is None and wanted != "sparse-embed":
        if masked_lm and wanted == "auto":
            raise ModelError(f"{source.uri}: a masked language model ({architectures[0]}, "
                             "logits over the vocabulary for each token); import it with "
                             "--task sparse-embed --pooling max to score SPLADE sparse vectors")
        return False
    if wanted not in ("auto", "sparse-embed"):
        return False
    if found is not None:
        config, name = found
        pooling = config.get("pooling_strategy", "max")
        activation = config.get("activation_function", "relu")
        where = f"{name} pooling_strategy {pooling}, activation_function {activation}"
    elif choices.pooling in ("max", "sum"):
        pooling, activation, where = choices.pooling, "relu", "--pooling (log1p(relu) as SPLADE)"
    else:
        raise ModelError(f"{source.uri}: --task sparse-embed needs the pooling: --pooling max "
                         "(SPLADE v2 and later) or --pooling sum (SPLADE v1)")
    if pooling not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise ModelError(f"{source.uri}: SPLADE pooling {pooling} with {activation}; "
                         "sparse-embed pools max or sum of relu or log1p_relu")
    dim = logits.dims[-1] if isinstance(logits.dims[-1], int) else \
        (source.json("config.json") or {}).get("vocab_size")
    if not isinstance(dim, int):
        raise ModelError(f"{source.uri}: the vocabulary size of logits is unknown")
    reading.outputs["logits"] = logits.name
    reading.sparse = {"pooling": pooling, "activation": activation, "dim": dim}
    reading.note("sparse.pooling", pooling, where)
    reading.note("sparse.dim", dim, "last dim of logits (the vocabulary)")
    reading.note("task", "sparse-embed", "--task" if wanted == "sparse-embed" else
                 "token inputs, MLM logits, SpladePooling in modules.json")
    return True


def _shape(info: TensorInfo) -> str:
    return "[" + ", ".join(str(d) for d in info.dims or []) + "]"


def _cross_encoder(source: ModelSource, logits: TensorInfo, reading: Reading,
                   choices: Choices) -> bool:
    """A sequence classifier with one label whose tokenizer encodes pairs: a reranker."""
    config = source.json("config.json") or {}
    wanted = choices.task
    width = logits.dims[-1] if logits.dims and isinstance(logits.dims[-1], int) else \
        len(config.get("id2label") or {}) or None
    pair = _pair_template(source)
    if width != 1 or not pair:
        if wanted == "rerank":
            why = f"output logits has {width} columns" if width != 1 else \
                "tokenizer.json has no pair template"
            raise ModelError(f"{source.uri}: --task rerank needs one logit per pair and a pair "
                             f"tokenizer ({why})")
        return False
    activation, where = (choices.activation, "--activation") if choices.activation else \
        _activation(source.json("config_sentence_transformers.json") or {}, config)
    reading.outputs["logits"] = logits.name
    reading.rerank = {"activation": activation}
    reading.note("outputs.logits", logits.name, "graph output name")
    reading.note("rerank.activation", activation, where)
    reading.note("task", "rerank", "--task" if wanted == "rerank" else
                 f"token inputs, one logit, tokenizer.json encodes pairs ({pair})")
    return True


def _pair_template(source: ModelSource) -> str | None:
    data = json.loads(source.configs["tokenizer.json"].read_text())
    post = data.get("post_processor") or {}
    processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing" and proc.get("pair"):
            return "TemplateProcessing pair"
        if proc.get("type") in ("BertProcessing", "RobertaProcessing"):
            return proc["type"]
    return None


def _activation(st_config: dict[str, Any], config: dict[str, Any]) -> tuple[str, str]:
    """The activation sentence-transformers' CrossEncoder applies: ``activation_fn`` in
    config_sentence_transformers.json (v5) or config.json's ``sentence_transformers`` (v4),
    ``sbert_ce_default_activation_function`` (before). With none of them the model is plain
    transformers' (an Optimum export), whose output is the raw logit: ``--activation sigmoid``
    asks for CrossEncoder's default."""
    named, where = st_config.get("activation_fn"), \
        "config_sentence_transformers.json activation_fn"
    if not named:
        named = (config.get("sentence_transformers") or {}).get("activation_fn")
        where = "config.json sentence_transformers.activation_fn"
    if not named:
        named, where = config.get("sbert_ce_default_activation_function"), \
            "config.json sbert_ce_default_activation_function"
    if not named:
        return "identity", ("no sentence-transformers config: the raw logit, as transformers "
                            "gives it (--activation sigmoid for CrossEncoder's default)")
    if named.endswith("Sigmoid"):
        return "sigmoid", f"{where} {named}"
    if named.endswith("Identity"):
        return "identity", f"{where} {named}"
    raise ModelError(f"config.json names the activation {named}; rerank applies Sigmoid or "
                     "Identity")


def _image_task(source: ModelSource, graph: Signature, choices: Choices,
                reading: Reading) -> str:
    outputs = {o.name: o for o in graph.outputs}
    wanted = choices.task
    if wanted not in ("auto", "embed", "classify"):
        raise ModelError(f"--task {wanted}: an image model is embed or classify")
    if "logits" in outputs and wanted in ("auto", "classify"):
        reading.outputs["logits"] = "logits"
        reading.labels = _id2label(source, outputs["logits"])
        reading.note("labels", f"{len(reading.labels)} labels", "config.json id2label")
        reading.note("task", "classify", "--task" if wanted == "classify" else
                     "image input, output logits")
        return "classify"
    if wanted in ("auto", "embed"):
        vector = next((outputs[n] for n in IMAGE_EMBEDDINGS if n in outputs
                       and outputs[n].dims and len(outputs[n].dims) == 2), None)
        token = outputs.get("last_hidden_state")
        out = vector or token
        if out is not None:
            pooling, where = ("in_graph", f"output {out.name} is [N, D]") if vector else \
                (choices.pooling, "--pooling") if choices.pooling else (None, "")
            if pooling is None:
                raise ModelError(f"{source.uri}: output last_hidden_state holds patch vectors "
                                 "and nothing says how to pool them; choose --pooling cls or "
                                 "--pooling mean")
            dim = out.dims[-1] if isinstance(out.dims[-1], int) else \
                (source.json("config.json") or {}).get("hidden_size")
            reading.outputs["embedding"] = out.name
            reading.embedding = {"pooling": pooling, "normalize": False, "dim": dim}
            reading.note("outputs.embedding", out.name, "graph output name")
            reading.note("embedding.pooling", pooling, where)
            reading.note("embedding.normalize", False, "the model's vectors as it gives them")
            reading.note("task", "embed", "--task" if wanted == "embed" else
                         f"image input, output {out.name}")
            return "embed"
    raise ModelError(f"{source.uri}: an image model needs an output logits (with id2label) or "
                     f"{', '.join(IMAGE_EMBEDDINGS[:3])} or last_hidden_state (outputs: "
                     f"{', '.join(outputs)})")


def _embedding(source: ModelSource, outputs: dict[str, TensorInfo], choices: Choices,
               reading: Reading) -> dict[str, Any] | None:
    if "sentence_embedding" in outputs:
        out, pooling, where = outputs["sentence_embedding"], "in_graph", "output sentence_embedding"
        normalize, norm_where = _normalize(source)
    else:
        token = next((outputs[n] for n in TOKEN_OUTPUTS if n in outputs), None)
        if token is None:
            return None
        out = token
        pooling, where = _pooling(source, token, choices)
        normalize, norm_where = _normalize(source)
    dim = out.dims[-1] if out.dims and isinstance(out.dims[-1], int) else \
        (source.json("config.json") or {}).get("hidden_size")
    if not isinstance(dim, int):
        raise ModelError(f"{source.uri}: the size of {out.name} is unknown (no fixed last dim, no "
                         "hidden_size in config.json)")
    reading.outputs["embedding"] = out.name
    reading.embedding = {"pooling": pooling, "normalize": normalize, "dim": dim}
    reading.note("outputs.embedding", out.name, "graph output name")
    reading.note("embedding.pooling", pooling, where)
    reading.note("embedding.normalize", normalize, norm_where)
    reading.note("embedding.dim", dim, f"last dim of {out.name}")
    return reading.embedding


def _pooling(source: ModelSource, token: TensorInfo, choices: Choices) -> tuple[str, str]:
    if choices.pooling:
        return choices.pooling, "--pooling"
    config = source.json("1_Pooling/config.json")
    if config is None:
        raise ModelError(f"{source.uri}: output {token.name} holds token vectors and nothing "
                         "says how to pool them (no 1_Pooling/config.json); choose --pooling "
                         "mean or --pooling cls")
    mode = config.get("pooling_mode")  # sentence-transformers 5: "mean", "cls", ...
    if mode in ("mean", "cls"):
        return mode, f"1_Pooling/config.json pooling_mode {mode}"
    if config.get("pooling_mode_mean_tokens"):  # before 5: one flag per mode
        return "mean", "1_Pooling/config.json pooling_mode_mean_tokens"
    if config.get("pooling_mode_cls_token"):
        return "cls", "1_Pooling/config.json pooling_mode_cls_token"
    modes = [str(mode)] if isinstance(mode, str) else \
        sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ModelError(f"{source.uri}: 1_Pooling/config.json asks for {', '.join(modes) or 'no'} "
                     "pooling; the embed task pools mean or cls (--pooling mean|cls)")


def _normalize(source: ModelSource) -> tuple[bool, str]:
    modules = source.configs.get("modules.json")
    if modules is None:
        return False, "no modules.json (no Normalize module)"
    entries = json.loads(modules.read_text())
    normalized = any(str(m.get("type", "")).endswith("Normalize") for m in entries)
    return normalized, "modules.json " + ("has" if normalized else "has no") + " Normalize"


def _id2label(source: ModelSource, logits: TensorInfo) -> list[str]:
    config = source.json("config.json") or {}
    mapping = config.get("id2label")
    if not isinstance(mapping, dict) or not mapping:
        raise ModelError(f"{source.uri}: output logits has no labels (no id2label in "
                         "config.json)")
    labels = [str(mapping[k]) for k in sorted(mapping, key=lambda k: int(k))]
    width = logits.dims[-1] if logits.dims else None
    if isinstance(width, int) and width != len(labels):
        raise ModelError(f"{source.uri}: config.json id2label has {len(labels)} labels, output "
                         f"logits has {width} columns")
    return labels


def _tabular_classifier(model: onnx.ModelProto, outputs: dict[str, TensorInfo],
                        zipmap: ZipMapRemoved | None, reading: Reading) -> bool:
    tensors = [o for o in outputs.values() if o.kind == "tensor"]
    label = next((o for o in tensors if o.dims is not None and len(o.dims) == 1), None)
    probs = next((o for o in tensors if o.dims is not None and len(o.dims) == 2
                  and o.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)), None)
    if probs is None:
        return False
    kind = "logits" if "logit" in probs.name.lower() else "probabilities"
    reading.outputs[kind] = probs.name
    reading.note(f"outputs.{kind}", probs.name,
                 f"the tensor ZipMap node {zipmap.node!r} read" if zipmap and
                 zipmap.probabilities == probs.name else "the [N, classes] float output")
    labels, where = None, ""
    if zipmap is not None:
        labels, where = zipmap.labels, f"ZipMap node {zipmap.node!r} classlabels"
    elif label is not None:
        labels = classifier_labels(model, label.name)
        where = f"the classifier node that computes {label.name}"
    if labels:
        reading.labels = labels
        reading.note("labels", labels, where)
    return True

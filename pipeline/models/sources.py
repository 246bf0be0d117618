"""What a converter wrote, found on disk: the ONNX file, its external data and the configs
beside it, in the layouts users have.

- a bare ``model.onnx`` (any ``*.onnx`` file), with external data files next to it;
- a sentence-transformers ONNX folder: ``onnx/model.onnx`` with ``modules.json``,
  ``1_Pooling/config.json``, ``sentence_bert_config.json`` and ``tokenizer.json``;
- an Optimum or ``save_pretrained`` folder: ``model.onnx`` with ``config.json``
  (``id2label``), ``tokenizer.json``, ``tokenizer_config.json`` and, for images,
  ``preprocessor_config.json``.

A remote source (any fsspec URI) is copied to a local folder first; only the files named here
and the model's external data are fetched.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

from pipeline import storage
from pipeline.errors import ModelError, storage_error

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "modules.json",
                "sentence_bert_config.json", "1_Pooling/config.json", "preprocessor_config.json",
                "1_SpladePooling/config.json",
                "special_tokens_map.json", "config_sentence_transformers.json",
                "generation_config.json", "chat_template.jinja")


@dataclass
class ModelSource:
    """A converter's output on this machine."""

    uri: str  # as given
    model: Path  # the .onnx file
    layout: str  # onnx-file | sentence-transformers | hf-folder | genai
    root: Path  # where the configs are (the folder given, or the model's own)
    configs: dict[str, Path] = field(default_factory=dict)  # CONFIG_FILES found, by name
    external: list[str] = field(default_factory=list)  # external data files, relative names
    # Other .onnx files beside the one taken (model_quantized.onnx beside model.onnx...).
    others: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.model.parent

    @property
    def where(self) -> str:
        """The model file, for messages."""
        if self.uri.endswith(".onnx"):
            return self.uri
        return f"{self.uri.rstrip('/')}/{self.model.relative_to(self.root).as_posix()}"

    def json(self, name: str) -> dict[str, Any] | None:
        """A config file's content, or None when the source has none."""
        path = self.configs.get(name)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.uri}: {name} is not readable JSON ({exc})") from exc
        return data if isinstance(data, dict) else None


def locate(uri: str, workdir: Path, storage_options: dict[str, Any] | None = None,
           model_file: str | None = None) -> ModelSource:
    """The model and configs at ``uri`` (a file or folder, local or remote); remote ones are
    copied under ``workdir``. ``model_file`` picks one of several .onnx files in a folder."""
    local = _local_copy(uri, workdir, storage_options) if not storage.is_local(uri) else \
        Path(uri.removeprefix("file://")).resolve()
    if not local.exists():
        raise ModelError(f"{uri}: no such file or folder")
    if model_file is None:  # a named file of the folder is imported as what it is
        generation_layout(local, uri)
    if model_file is None and local.is_dir() and (local / GENAI_CONFIG).is_file():
        return _genai_source(local, uri)
    model, layout, config_root = _find_model(local, uri, model_file)
    configs = {name: config_root / name for name in CONFIG_FILES
               if (config_root / name).is_file()}
    if layout == "onnx-file" and {"config.json", "tokenizer.json",
                                  "preprocessor_config.json"} & set(configs):
        layout = "hf-folder"
    others = sorted(p.relative_to(config_root).as_posix() for p in model.parent.glob("*.onnx")
                    if p != model) if layout != "onnx-file" else []
    return ModelSource(uri, model, layout, config_root, configs, external_files(model, uri),
                       others)


GENAI_CONFIG = "genai_config.json"
# What onnxruntime-genai reads from a model folder besides the graph and its weights.
GENAI_FILES = (GENAI_CONFIG, "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "generation_config.json")


def _genai_source(local: Path, uri: str) -> ModelSource:
    """An onnxruntime-genai model folder: the decoder its config names, and the files the
    runtime reads beside it, which travel with the bundle."""
    try:
        config = json.loads((local / GENAI_CONFIG).read_text())
        filename = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{uri}/{GENAI_CONFIG}: no model.decoder.filename ({exc})") from exc
    model = local / filename
    if not model.is_file():
        raise ModelError(f"{uri}/{GENAI_CONFIG}: names the decoder {filename}, which is not "
                         "in the folder")
    configs = {name: local / name for name in CONFIG_FILES if (local / name).is_file()}
    configs[GENAI_CONFIG] = local / GENAI_CONFIG
    extra = [name for name in GENAI_FILES if (local / name).is_file()]
    return ModelSource(uri, model, "genai", local, configs,
                       external_files(model, uri) + extra, [])


# Files that make a folder a generation model: a loop of decoder steps, not one forward pass.
SEQ2SEQ_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_model_merged.onnx",
                 "decoder_with_past_model.onnx")


def generation_layout(local: Path, uri: str) -> None:
    """Refuse, in one line that says what it is, a folder of a text generation model (one
    file of it, named, is imported as what it is: a T5 encoder embeds)."""
    if not local.is_dir():
        return
    folder = local
    found = [name for name in SEQ2SEQ_FILES if (folder / name).is_file()]
    if "encoder_model.onnx" in found and len(found) > 1:
        raise ModelError(f"{uri}: a text generation model (an Optimum seq2seq export: "
                         f"{', '.join(found)}); the encoder runs once and the decoder step by "
                         "step, which no task here runs yet")


def _find_model(local: Path, uri: str, model_file: str | None) -> tuple[Path, str, Path]:
    if local.is_file():
        if local.suffix != ".onnx":
            raise ModelError(f"{uri}: not an .onnx file or a folder holding one")
        return local, "onnx-file", local.parent
    if model_file is not None:
        chosen = local / model_file
        if not chosen.is_file() or chosen.suffix != ".onnx":
            found = ", ".join(p.relative_to(local).as_posix()
                              for p in sorted(local.glob("**/*.onnx"))) or "none"
            raise ModelError(f"--model-file {model_file}: no such .onnx file in {uri} "
                             f"(.onnx files: {found})")
        return chosen, "hf-folder", local
    st_model = local / "onnx" / "model.onnx"
    if st_model.is_file() and (local / "modules.json").is_file():
        return st_model, "sentence-transformers", local
    if (local / "model.onnx").is_file():
        return local / "model.onnx", "hf-folder", local
    found = sorted(p for p in local.glob("*.onnx"))
    if len(found) == 1:
        return found[0], "hf-folder", local
    if not found:
        raise ModelError(f"{uri}: no .onnx file in this folder (nor onnx/model.onnx with "
                         "modules.json)")
    raise ModelError(f"{uri}: several models ({', '.join(p.name for p in found)}); choose one "
                     "with --model-file (or name it: SRC/<file>.onnx)")


def external_files(model: Path, uri: str) -> list[str]:
    """The external data files the model's initializers point to (relative to its folder),
    each checked to exist."""
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a file that is no model
        raise ModelError(f"{uri}: {model.name} is not an ONNX model ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160] or 'cannot parse'})") from exc
    names = sorted({{e.key: e.value for e in t.external_data}.get("location", "")
                    for t in _tensors(proto.graph)
                    if external_data_helper.uses_external_data(t)})
    for name in names:
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelError(f"{uri}: external data location {name!r} must be a file next to "
                             f"{model.name}")
        if not (model.parent / name).is_file():
            raise ModelError(f"{uri}: {model.name} keeps its weights in {name}, which is "
                             "missing; copy it next to the model")
    return names


def _tensors(graph: onnx.GraphProto):
    """Every initializer and tensor attribute of the graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _tensors(sub)


def _local_copy(uri: str, workdir: Path, storage_options: dict[str, Any] | None) -> Path:
    """Copy a remote source: the .onnx file and what lies beside it, or the whole folder."""
    target = workdir / "source"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    try:
        fs, path = storage.filesystem(uri, storage_options)
        if path.endswith(".onnx"):
            parent = path.rsplit("/", 1)[0]
            fs.get(path, str(target / path.rsplit("/", 1)[-1]))
            for entry in fs.ls(parent, detail=False):
                name = entry.rsplit("/", 1)[-1]
                if name in CONFIG_FILES or name.startswith(Path(path).stem + ".onnx") \
                        or name.endswith((".data", ".onnx_data", ".bin")):
                    fs.get(entry, str(target / name))
            return target / path.rsplit("/", 1)[-1]
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
        return target
    except ModelError:
        raise
    except Exception as exc:
        raise storage_error(exc, "model.uri", uri, "read the model at", storage_options) from exc

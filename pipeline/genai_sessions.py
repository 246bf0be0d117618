"""An onnxruntime-genai model as a worker's session: a bundle folder that is a genai model
folder (``genai_config.json``, ``model.onnx``, tokenizer files) loaded by ``og.Model`` on the
provider the pool asks for, CUDA where onnxruntime-genai can use it, else the CPU.

Only the generate task runs it (``pipeline.models.genai_loop``); to the rest of the worker it
looks like a session: ``get_providers()`` says what runs it, ``get_inputs()`` has nothing to
type. onnxruntime-genai is an extra (``pip install 'onnx-ray-pipeline[genai]'``).
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from pipeline.errors import ConfigError

INSTALL = "pip install 'onnx-ray-pipeline[genai]'"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def require_genai(key: str) -> None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ConfigError(f"{key}: an onnxruntime-genai model needs the onnxruntime-genai "
                          f"package, which is not installed ({INSTALL})")


class GenaiSession:
    def __init__(self, folder: str, provider: str, intra_op_threads: int = 0):
        import onnxruntime_genai as og

        config = og.Config(folder)
        if intra_op_threads > 0:  # the pool's CPUs, as a plain session gets them
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": intra_op_threads}}}}))
        config.clear_providers()
        if provider == "cuda":
            config.append_provider("cuda")
        self.og = og
        self.model = og.Model(config)
        self.provider = provider

    def get_providers(self) -> list[str]:
        return [PROVIDERS[self.provider]]

    def get_inputs(self) -> list[Any]:
        return []

    def get_outputs(self) -> list[Any]:
        return []

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> Any:
        raise TypeError("an onnxruntime-genai model runs through its generator, not run()")


def genai_provider(requested: tuple[str, ...]) -> tuple[str, str | None]:
    """The provider that runs the model of those asked for, and why the first was not it."""
    import onnxruntime_genai as og

    for name in requested:
        if name in ("cpu", "cuda") and (name == "cpu" or og.is_cuda_available()):
            why = None if name == requested[0] else \
                f"{requested[0]} does not run onnxruntime-genai here; running on {name}"
            return name, why
    return "cpu", f"none of {', '.join(requested)} runs onnxruntime-genai here; running on cpu"

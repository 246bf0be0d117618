"""What a causal LM exported with its KV cache is (Optimum's ``text-generation-with-past``):
the graph's token, position and cache inputs, when a text ends, what pads a batch and how long
a context may be, read from ``generation_config.json``, ``config.json`` and
``tokenizer_config.json`` as transformers' ``generate`` reads them.

- End of sequence: ``generation_config.json``'s ``eos_token_id`` (one id or a list), else
  config.json's.
- Padding (masked out, so any id works; the one transformers would use is recorded):
  ``pad_token_id`` in either file, else the tokenizer's ``pad_token``, else the first eos.
- The context: config.json's ``max_position_embeddings`` (``n_positions`` for GPT-2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pipeline.errors import ModelError
from pipeline.models.decoding import CacheLayout, Generated, Sampling, generate, left_padded
from pipeline.models.genai_loop import genai_generate
from pipeline.models.onnx_types import Signature

PAST = re.compile(r"^past_key_values\.\d+\.(key|value)$")
CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def cache_inputs(graph: Signature) -> list[str]:
    return [i.name for i in graph.inputs if PAST.match(i.name)]


def read_causal(config: dict[str, Any], generation: dict[str, Any],
                tokenizer_config: dict[str, Any], vocabulary: dict[str, int],
                graph: Signature | None, where: str) -> dict[str, Any]:
    """The bundle's generation section for a causal export with its cache (``graph`` None:
    its inputs are another runtime's business)."""
    names = {i.name for i in graph.inputs} if graph is not None else set()
    if graph is not None and ("input_ids" not in names or "attention_mask" not in names or
                              not any(o.name == "logits" for o in graph.outputs)):
        raise ModelError(f"{where}: a causal LM with a KV cache needs inputs input_ids and "
                         "attention_mask and an output logits")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if not eos_ids:
        raise ModelError(f"{where}: no eos_token_id in generation_config.json or config.json: "
                         "nothing says when a text ends")
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        token = tokenizer_config.get("pad_token")
        token = token.get("content") if isinstance(token, dict) else token
        pad = vocabulary.get(token) if isinstance(token, str) else None
    context = config.get("max_position_embeddings") or config.get("n_positions")
    if not isinstance(context, int) or context < 2:
        raise ModelError(f"{where}: no max_position_embeddings in config.json: the context "
                         "window is unknown")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"),
                        None)
    return {"runtime": "onnx-causal", "eos_token_ids": eos_ids,
            "chat_template": template if isinstance(template, str) else None,
            "special_tokens": special_tokens(tokenizer_config),
            "pad_token_id": int(pad if pad is not None else eos_ids[0]),
            "max_context": int(context),
            "clean_up_spaces": bool(tokenizer_config.get("clean_up_tokenization_spaces", False))}


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """The special tokens a chat template may name, as transformers passes them to it."""
    found = {}
    for key in SPECIAL_TOKENS:
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[key] = value
    return found


PROBE_TEXTS = ("a", "the river runs to the sea and further", "ok then")


def probe_prompts(tokenizer_path: str) -> list[list[int]]:
    """Prompts of different lengths, tokenized as a job tokenizes them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [e.ids for e in tokenizer.encode_batch(list(PROBE_TEXTS))]


def read_genai(genai_config: dict[str, Any], tokenizer_config: dict[str, Any],
               vocabulary: dict[str, int], where: str) -> dict[str, Any]:
    """The bundle's generation section for an onnxruntime-genai model folder: its ids and
    context from genai_config.json (``model.eos_token_id``, ``pad_token_id``,
    ``context_length``), the chat template and special tokens from the tokenizer's files."""
    model = genai_config.get("model") or {}
    eos = model.get("eos_token_id")
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    context = model.get("context_length")
    if not eos_ids or not isinstance(context, int):
        raise ModelError(f"{where}: genai_config.json needs model.eos_token_id and "
                         "model.context_length")
    # onnxruntime-genai masks every token equal to its pad id (0 when its config names none):
    # padding must be that id, whatever the tokenizer calls padding.
    causal = read_causal({"eos_token_id": eos_ids,
                          "pad_token_id": int(model.get("pad_token_id") or 0),
                          "max_position_embeddings": context}, {}, tokenizer_config,
                         vocabulary, None, where)
    return {**causal, "runtime": "genai"}


def greedy_runner(session: Any, spec: Any) -> Callable[[list[list[int]], int], list[Generated]]:
    """Greedy generation of prompts by the runtime a bundle names (``spec``: its generation
    section), for checks: onnxruntime with the pipeline's loop, or onnxruntime-genai."""
    pad, context, eos = spec.pad_token_id, spec.max_context, set(spec.eos_token_ids)

    if spec.runtime == "genai":
        def run(prompts: list[list[int]], new: int) -> list[Generated]:
            return genai_generate(session, prompts, list(range(len(prompts))), Sampling(new),
                                  eos, [new] * len(prompts), pad, context)
        return run
    layout = CacheLayout.of(session)

    def run_onnx(prompts: list[list[int]], new: int) -> list[Generated]:
        return generate(session, layout, *left_padded(prompts, pad), list(range(len(prompts))),
                        Sampling(new), eos, [new] * len(prompts))
    return run_onnx

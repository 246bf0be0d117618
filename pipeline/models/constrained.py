"""Output held to a JSON schema while it is generated, with llguidance (the grammar engine
onnxruntime-genai's guidance uses): before each token the row's matcher says which tokens may
come next, every other one is masked out of the logits, and the chosen token moves the
matcher on. A text ends when its JSON is complete.

llguidance is an extra (``pip install 'onnx-ray-pipeline[generate]'``); without it a job with
``task.json_schema`` exits 2 naming the install.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

INSTALL = "pip install 'onnx-ray-pipeline[generate]'"


def require_llguidance(key: str) -> None:
    if importlib.util.find_spec("llguidance") is None:
        raise ConfigError(f"{key}: output held to a JSON schema needs the llguidance package, "
                          f"which is not installed ({INSTALL})")


class SchemaGrammar:
    """A JSON schema compiled for one tokenizer; ``matcher()`` gives a row its own state."""

    def __init__(self, schema: dict[str, Any], tokenizer_json: str, eos: list[int],
                 key: str):
        require_llguidance(key)
        import llguidance

        self.llguidance = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        try:
            self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
        probe = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if probe.is_error():
            raise ConfigError(f"{key}: the schema cannot be compiled to a grammar "
                              f"({probe.get_error()})")

    def matcher(self) -> RowConstraint:
        return RowConstraint(self.llguidance.LLMatcher(self.tokenizer, self.grammar,
                                                       log_level=0))


class RowConstraint:
    """One row's grammar state: the tokens allowed next, and the tokens taken."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def allowed(self, vocab: int) -> np.ndarray:
        """A bool per logit: may this token come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little").astype(bool)
        if len(allowed) < vocab:  # logits past the tokenizer's vocabulary never may
            allowed = np.concatenate([allowed, np.zeros(vocab - len(allowed), bool)])
        return allowed[:vocab]

    def take(self, token: int) -> bool:
        """Move on by ``token``; True when the grammar is complete (the text ends)."""
        if not self.matcher.consume_token(token):
            raise ValueError(f"the schema's grammar refused token {token} "
                             f"({self.matcher.get_error()})")
        return self.matcher.is_stopped()

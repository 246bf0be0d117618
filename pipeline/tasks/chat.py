"""Chat prompts: messages rendered with the model's chat template as transformers'
``apply_chat_template(messages, add_generation_prompt=True)`` renders them (a sandboxed Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, its ``tojson``, ``raise_exception``
and ``strftime_now``, the tokenizer's special tokens as variables), to be tokenized without
special tokens (the template writes them).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates use to mark
    the assistant's tokens for training: rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"{where}: the chat template does not compile ({exc})") from exc
        self.special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for ``messages``, ending where the assistant's answer starts;
        ValueError (the row's reason) when the template refuses them."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=True, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template refused the messages ({exc})") from exc


def messages_of(value: Any, system: str | None) -> list[dict[str, Any]]:
    """A row's messages: a prompt string becomes one user message; a list of {role, content}
    is taken as it is. ``system`` goes first unless the row has its own."""
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        messages = [dict(m) for m in value]
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise ValueError(f"message {i} needs a role ({', '.join(ROLES)}) and a string "
                                 f"content, not {json.dumps(message, default=str)[:120]}")
    else:
        raise ValueError("messages must be a list of {role, content} (non-empty)")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages

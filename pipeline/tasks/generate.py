"""Text generation: a causal LM writes a text for each prompt, as transformers' ``generate``
writes it (``pipeline.models.decoding`` runs the loop).

Prompts are tokenized as the model's tokenizer does (its template adds ``<s>`` where the
model wants it), sorted by length and batched by a token budget that counts each prompt and
its ``max_new_tokens`` (what the KV cache holds at the end). A prompt that leaves no room in
the context window is a dead letter that gives its length. Outputs: the text (special tokens
skipped, cut before a stop string), why it ended (``stop``: its end-of-sequence token or a
stop string; ``length``: ``max_new_tokens`` or the context window), the prompt's tokens and
the new ones (the token that ended the text counted, as ``generate`` returns it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.genai_sessions import require_genai
from pipeline.models.constrained import SchemaGrammar
from pipeline.models.decoding import (
    FAILED,
    LENGTH,
    SCHEMA,
    STOP,
    CacheLayout,
    Sampling,
    generate,
    left_padded,
)
from pipeline.models.genai_loop import genai_generate
from pipeline.tasks.base import Batch, Prepared, Task
from pipeline.tasks.chat import ChatTemplate, messages_of
from pipeline.tasks.text import load_tokenizer, valid_texts

REASONS = {STOP: "stop", LENGTH: "length", SCHEMA: "schema"}
# transformers' clean_up_tokenization: spaces before punctuation and contractions dropped.
CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# Feeds that travel with a batch for the loop, not the graph: split with it row by row.
KEYS, ROOM = "_row_keys", "_room"


class GenerateTask(Task):

    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        generation = bundle.spec.generation
        if generation is None or bundle.spec.text is None:
            raise ConfigError(f"task.kind: generate needs a text generation bundle (a causal "
                              f"LM with its KV cache), {bundle.uri} is not")
        self.generation = generation
        self.tokenizer = load_tokenizer(str(bundle.tokenizer_path), generation.max_context)
        self.tokenizer.no_truncation()  # a prompt is never cut: one that does not fit is refused
        self.eos = set(generation.eos_token_ids)
        self.chat = None
        if spec.chats:
            if not generation.chat_template:
                raise ConfigError(f"task.chat: {bundle.uri} has no chat template (none in its "
                                  "tokenizer_config.json or chat_template.jinja); use prompts")
            self.chat = ChatTemplate(generation.chat_template, generation.special_tokens,
                                     bundle.uri)
        self.sampling = Sampling(spec.max_new_tokens, spec.temperature, spec.top_k, spec.top_p,
                                 spec.seed)
        self.layout: CacheLayout | None = None  # read from the session on its first batch
        self.grammar = self.validator = None
        self.genai = generation.runtime == "genai"
        if self.genai:
            require_genai("model.uri")
        if spec.json_schema is not None:
            self.validator = schema_validator(spec.json_schema)
            if not self.genai:  # onnxruntime-genai holds the schema with its own guidance
                self.grammar = SchemaGrammar(spec.json_schema, self.tokenizer.to_str(),
                                             sorted(self.eos), "task.json_schema")

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.messages_column or self.spec.prompt_column]

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_column, pa.string()),
                          ("finish_reason", pa.string()), ("tokens_in", pa.int32()),
                          ("tokens_out", pa.int32())])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["logits"]]

    def prepare(self, table: pa.Table) -> Prepared:
        if self.chat is not None:
            rows, prompts, bad = self._chat_prompts(table)
            # The template wrote the special tokens: none are added.
            encodings = self.tokenizer.encode_batch(prompts, add_special_tokens=False) \
                if prompts else []
        else:
            column = self.spec.prompt_column
            rows, prompts, bad = valid_texts(table[column], column, keep_empty=False)
            encodings = self.tokenizer.encode_batch(prompts) if prompts else []
        context = self.generation.max_context
        kept = []
        pad = self.generation.pad_token_id
        for row, prompt, encoding in zip(rows, prompts, encodings, strict=True):
            length = len(encoding.ids)
            if length >= context:
                bad[row] = f"prompt is {length} tokens; the model's context window is " \
                           f"{context}, with room for no new token"
            elif self.genai and pad in encoding.ids:
                bad[row] = f"prompt holds token {pad}, onnxruntime-genai's pad id, which it " \
                           "masks out wherever it stands (the text would be read without it)"
            else:
                kept.append((row, prompt, encoding.ids))
        kept.sort(key=lambda item: len(item[2]))
        return Prepared(batches=self._batches(kept), bad=bad)

    def _chat_prompts(self, table: pa.Table) -> tuple[list[int], list[str], dict[int, str]]:
        """Each row's messages rendered by the chat template; reasons for rows that have none
        or that the template refuses."""
        column = self.spec.messages_column or self.spec.prompt_column
        rows, prompts, bad = [], [], {}
        for row, value in enumerate(table[column].to_pylist()):
            if value is None or value == "":
                bad[row] = f"{column} is {'null' if value is None else 'empty'}"
                continue
            try:
                prompts.append(self.chat.render(messages_of(value, self.spec.system)))
            except ValueError as exc:
                bad[row] = f"{column}: {exc}"
                continue
            rows.append(row)
        return rows, prompts, bad

    def _batches(self, kept: list[tuple[int, str, list[int]]]) -> list[Batch]:
        """Runs of similar length within the row cap and a token budget of prompt plus new
        tokens per row (the KV cache a batch ends with)."""
        new = self.spec.max_new_tokens
        batches, start = [], 0
        while start < len(kept):
            end = start + 1
            while end < len(kept) and end - start < self.batching.max_rows and \
                    (end + 1 - start) * (len(kept[end][2]) + new) <= self.batching.max_tokens:
                end += 1
            batches.append(self._batch(kept[start:end]))
            start = end
        return batches

    def _batch(self, part: list[tuple[int, str, list[int]]]) -> Batch:
        ids, mask = left_padded([p for _, _, p in part], self.generation.pad_token_id)
        context = self.generation.max_context
        keys = np.asarray([_row_key(row, prompt) for row, prompt, _ in part], np.int64)
        room = np.asarray([min(self.spec.max_new_tokens, context - len(p)) for _, _, p in part],
                          np.int64)
        return Batch(rows=np.asarray([r for r, _, _ in part], np.int64),
                     feeds={"input_ids": ids, "attention_mask": mask, KEYS: keys, ROOM: room},
                     meta=[len(p) for _, _, p in part])

    def run_model(self, session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The loop for a batch: new tokens ``[rows, longest]`` (-1 past each row's end),
        their counts and finish reasons."""
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        stopped = self._stopped if self.spec.stop else None
        if self.genai:
            prompts = [row[keep == 1].tolist() for row, keep in zip(ids, mask, strict=True)]
            results = genai_generate(session, prompts, feeds[KEYS].tolist(), self.sampling,
                                     self.eos, feeds[ROOM].tolist(),
                                     self.generation.pad_token_id,
                                     self.generation.max_context, stopped,
                                     self.spec.json_schema)
        else:
            results = self._onnx_generate(session, ids, mask, feeds, stopped)
        width = max(len(r.ids) for r in results)
        tokens = np.full((len(results), width), -1, np.int64)
        for i, result in enumerate(results):
            tokens[i, :len(result.ids)] = result.ids
        return [tokens, np.asarray([len(r.ids) for r in results], np.int32),
                np.asarray([r.reason for r in results], np.int8),
                np.asarray([r.error for r in results], dtype=object)]

    def _onnx_generate(self, session, ids: np.ndarray, mask: np.ndarray,
                       feeds: dict[str, np.ndarray], stopped) -> list:
        if self.layout is None:
            self.layout = CacheLayout.of(session)
        # Rows split off a batch keep its left padding: drop the columns none of them use.
        used = int(mask.any(axis=0).argmax()) if mask.any() else 0
        constraints = [self.grammar.matcher() for _ in range(len(ids))] if self.grammar \
            else None  # fresh for every run: a retried row starts its grammar again
        return generate(session, self.layout, ids[:, used:], mask[:, used:],
                        feeds[KEYS].tolist(), self.sampling, self.eos, feeds[ROOM].tolist(),
                        stopped, constraints)

    def _stopped(self, _row: int, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(stop in text for stop in self.spec.stop)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        tokens, counts, reasons, errors = outputs
        texts, finish, bad, good = [], [], {}, []
        for i in range(len(batch)):
            row = int(batch.rows[i])
            if int(reasons[i]) == FAILED:
                bad[row] = f"generation failed: {errors[i]}"
                continue
            text = self._text(tokens[i, :counts[i]].tolist())
            reason = REASONS[int(reasons[i])]
            for stop in self.spec.stop:
                at = text.find(stop)
                if at >= 0:
                    text, reason = text[:at], "stop"
            problem = self._schema_problem(text, reason)
            if problem:
                bad[row] = problem
                continue
            texts.append(text)
            finish.append(reason)
            good.append(i)
        return {self.spec.output_column: pa.array(texts, pa.string()),
                "finish_reason": pa.array(finish, pa.string()),
                "tokens_in": pa.array([batch.meta[i] for i in good], pa.int32()),
                "tokens_out": pa.array(counts[good], pa.int32())}, bad

    def _schema_problem(self, text: str, reason: str) -> str | None:
        """Why a text is not JSON that meets task.json_schema (None: it is, or no schema)."""
        if self.validator is None:
            return None
        cut = " (cut at max_new_tokens)" if reason == "length" else ""
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"response is not JSON{cut}: {exc}"
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the response"
            return f"response does not match task.json_schema at {where}: {error.message}"
        return None

    def _text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.generation.clean_up_spaces:
            for before, after in CLEAN_UPS:
                text = text.replace(before, after)
        return text


def schema_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema validator for the schema's own draft; ConfigError for a schema that is
    not valid."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"task.json_schema: not a valid JSON schema ({exc.message})") from exc
    return validator(schema)


def _row_key(row: int, prompt: str) -> int:
    """A row's sampling key: its position and its prompt (stable across runs of a shard)."""
    digest = hashlib.blake2b(f"{row}\0{prompt}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")

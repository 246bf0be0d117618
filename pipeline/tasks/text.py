"""Text inputs: tokenize with HF tokenizers, sort by length, cut batches by a token budget.

Padding waste is the main cost of transformer inference on CPU, so rows of similar length
are batched together; the caller restores the input order from ``Batch.rows``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from pipeline.errors import ConfigError, ModelError
from pipeline.tasks.base import Batch, Prepared

_FIELDS = {"tokens.ids": "ids", "tokens.attention_mask": "attention_mask",
           "tokens.type_ids": "type_ids"}
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelError(f"{path}: cannot load tokenizer ({exc})") from exc
    pad = pad_id(tokenizer)
    # Whatever the file says, padding is ours (per batch) and truncation is the task's. A
    # pair is cut longest side first, one token at a time, as Hugging Face's default does.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    tokenizer.pad_id = pad  # type: ignore[attr-defined]  # read by TextEncoder
    return tokenizer


def task_tokenizer(bundle: Any, spec: Any) -> tuple[Tokenizer, int]:
    """The bundle's tokenizer truncating at the task's ``max_length`` (default: the bundle's,
    which the task may lower but not raise), and that length."""
    limit = bundle.spec.text.max_length
    max_length = spec.max_length or limit
    if max_length > limit:
        raise ConfigError(f"task.max_length: {max_length} exceeds the bundle's max_length {limit}")
    return load_tokenizer(str(bundle.tokenizer_path), max_length), max_length


def pad_id(tokenizer: Tokenizer) -> int:
    """The id a batch is padded with: the file's padding token, else a conventional pad token.
    RoBERTa-style models number positions by ``id != pad id``: padding with 0 (``<s>``) would
    not be padding to them."""
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    return next((i for i in map(tokenizer.token_to_id, PAD_TOKENS) if i is not None), 0)


def truncation_note(max_length: int) -> str:
    return f"text cut at max_length ({max_length} tokens)"


def valid_texts(column: pa.ChunkedArray, name: str,
                keep_empty: bool) -> tuple[list[int], list[str], dict[int, str]]:
    """The rows holding a text, their texts, and why the others hold none (null, empty or
    blank unless ``keep_empty``, not a string column)."""
    bad: dict[int, str] = {}
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        reason = f"column {name} has type {column.type}, expected string"
        return [], [], dict.fromkeys(range(len(column)), reason)
    values = column.to_pylist()
    if keep_empty:
        empty = np.zeros(len(values), dtype=bool)
    else:
        empty = np.asarray(pc.equal(pc.utf8_trim_whitespace(column.fill_null("x")), "")
                           .to_numpy(zero_copy_only=False), dtype=bool)
    rows, texts = [], []
    for i, value in enumerate(values):
        if value is None:
            bad[i] = f"{name} is null"
        elif empty[i]:
            bad[i] = f"{name} is empty"
        else:
            rows.append(i)
            texts.append(value)
    return rows, texts, bad


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, inputs: dict[str, str], keep_empty: bool):
        self.tokenizer = tokenizer
        self.inputs = inputs  # graph input name -> tokens.* source
        self.keep_empty = keep_empty
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self.max_length = (tokenizer.truncation or {}).get("max_length")

    def valid_texts(self, column: pa.ChunkedArray, name: str) -> tuple[list[int], list[str], dict[int, str]]:
        return valid_texts(column, name, self.keep_empty)

    def encode(self, rows: list[int], texts: list[str] | list[tuple[str, str]],
               bad: dict[int, str]):
        """Encodings of ``texts`` (single texts, or pairs encoded together)."""
        try:
            return rows, self.tokenizer.encode_batch(texts)
        except Exception:
            # One text broke the batch: encode one by one to find it, keep the rest.
            kept_rows, encodings = [], []
            for row, text in zip(rows, texts, strict=True):
                try:
                    encodings.append(self.tokenizer.encode(*text) if isinstance(text, tuple)
                                     else self.tokenizer.encode(text))
                    kept_rows.append(row)
                except Exception as exc:
                    bad[row] = f"tokenizer failed: {exc}"
            return kept_rows, encodings

    def prepare(self, column: pa.ChunkedArray, name: str, max_rows: int, max_tokens: int) -> Prepared:
        rows, texts, bad = self.valid_texts(column, name)
        rows, encodings = self.encode(rows, texts, bad)
        return Prepared(batches=self.batches(rows, encodings, max_rows, max_tokens), bad=bad,
                        notes=self.truncated(encodings))

    def truncated(self, encodings: list) -> dict[str, int]:
        """Texts that lost tokens to max_length, counted for the report."""
        cut = sum(1 for e in encodings if e.overflowing)
        return {truncation_note(self.max_length): cut} if cut else {}

    def prepare_pairs(self, first: pa.ChunkedArray, first_name: str, second: pa.ChunkedArray,
                      second_name: str, max_rows: int, max_tokens: int) -> Prepared:
        """Rows of two texts, each pair tokenized together (``[CLS] a [SEP] b [SEP]`` for BERT,
        as the tokenizer's pair template says)."""
        rows_a, texts_a, bad = self.valid_texts(first, first_name)
        rows_b, texts_b, bad_b = self.valid_texts(second, second_name)
        for row, reason in bad_b.items():
            bad.setdefault(row, reason)
        seconds = dict(zip(rows_b, texts_b, strict=True))
        rows = [r for r in rows_a if r in seconds and r not in bad]
        firsts = dict(zip(rows_a, texts_a, strict=True))
        rows, encodings = self.encode(rows, [(firsts[r], seconds[r]) for r in rows], bad)
        return Prepared(batches=self.batches(rows, encodings, max_rows, max_tokens), bad=bad,
                        notes=self.truncated(encodings))

    def batches(self, rows: list[int], encodings: list, max_rows: int,
                max_tokens: int) -> list[Batch]:
        """Length-sorted batches within the row cap and the token budget."""
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        order = np.argsort(lengths, kind="stable")
        batches: list[Batch] = []
        start = 0
        while start < len(order):
            end = start + 1
            # Sorted ascending, so the newest row is the longest: the batch pads to it.
            while (end < len(order) and end - start < max_rows
                   and (end - start + 1) * lengths[order[end]] <= max_tokens):
                end += 1
            picked = order[start:end]
            batches.append(self.feed_batch(np.asarray(rows)[picked], [encodings[i] for i in picked]))
            start = end
        return batches

    def grouped_batches(self, rows: list[int], groups: list[list], meta: list | None,
                        max_rows: int, max_tokens: int) -> list[Batch]:
        """Batches of rows that are fed as several model rows each (a long text's windows, a
        text paired with each label): sorted by a row's widest encoding, a row's model rows
        kept in one batch and each counted against the row cap and the token budget (a row
        alone always makes a batch)."""
        widths = np.fromiter((max(len(e.ids) for e in g) for g in groups), np.int64,
                             count=len(groups))
        order = np.argsort(widths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            end, fed = start + 1, len(groups[order[start]])
            while end < len(order):
                more = fed + len(groups[order[end]])
                if more > max_rows or more * widths[order[end]] > max_tokens:
                    break
                fed, end = more, end + 1
            picked = order[start:end]
            flat = [e for i in picked for e in groups[i]]
            spans = np.concatenate([[0], np.cumsum([len(groups[i]) for i in picked])])
            batch = self.feed_batch(np.asarray([rows[i] for i in picked], dtype=np.int64), flat)
            batches.append(Batch(batch.rows, batch.feeds, spans.astype(np.int64),
                                 [meta[i] for i in picked] if meta is not None else None))
            start = end
        return batches

    def feed_batch(self, rows: np.ndarray, encodings: list) -> Batch:
        width = max(len(e.ids) for e in encodings)
        arrays = {f: np.zeros((len(encodings), width), dtype=np.int64) for f in _FIELDS.values()}
        arrays["ids"][:] = self.pad_id
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            arrays["ids"][i, :n] = enc.ids
            arrays["attention_mask"][i, :n] = enc.attention_mask
            arrays["type_ids"][i, :n] = enc.type_ids
        feeds = {name: arrays[_FIELDS[src]] for name, src in self.inputs.items() if src in _FIELDS}
        return Batch(rows=rows, feeds=feeds)

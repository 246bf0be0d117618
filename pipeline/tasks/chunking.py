"""Long texts cut into chunks on token (or sentence) boundaries, and chunk rows made from them.

A text is tokenized once with offsets; its chunks are windows of at most ``max_tokens``
tokens of text (special tokens added to each), consecutive windows sharing ``overlap`` tokens
(tokenizers' own stride), or whole sentences packed greedily up to ``max_tokens`` (a sentence
longer than that is cut by tokens). Each chunk knows its character span in the text.

A task that writes a row per chunk returns, for each input row, a list of chunk structs;
``explode`` turns those into rows, the input row's passthrough columns repeated on each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

CHUNK_COLUMN = "_chunks"  # what finish() returns per input row; exploded before writing
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n\s*\n")


@dataclass(frozen=True)
class Chunk:
    encoding: Any  # tokenizers.Encoding, special tokens included
    start: int  # character offsets of the chunk in its text
    end: int


class Chunker:
    """Chunks of a text for a tokenizer: ``max_tokens`` of text each, ``overlap`` shared."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int, by: str) -> None:
        self.specials = tokenizer.num_special_tokens_to_add(False)
        self.max_tokens, self.overlap, self.by = max_tokens, overlap, by
        self.windows = Tokenizer.from_str(tokenizer.to_str())
        self.windows.no_padding()
        self.windows.enable_truncation(max_tokens + self.specials, stride=overlap,
                                       strategy="longest_first")
        self.whole = Tokenizer.from_str(tokenizer.to_str())
        self.whole.no_padding()
        self.whole.no_truncation()

    def chunks(self, texts: list[str]) -> list[list[Chunk]]:
        if self.by == "sentence":
            return [self._sentences(text) for text in texts]
        return [self._windows(text, encoding)
                for text, encoding in zip(texts, self.windows.encode_batch(texts), strict=True)]

    def _windows(self, text: str, encoding: Any, shift: int = 0) -> list[Chunk]:
        out = []
        for window in [encoding, *encoding.overflowing]:
            span = _text_span(window)
            if span is None and out:
                continue  # a window of special tokens only (the tail of an exact fit)
            start, end = span if span is not None else (0, len(text))
            out.append(Chunk(window, start + shift, end + shift))
        return out

    def _sentences(self, text: str) -> list[Chunk]:
        """Whole sentences packed up to max_tokens; a longer sentence cut by tokens."""
        spans, start = [], 0
        for match in SENTENCE_END.finditer(text):
            spans.append((start, match.start()))
            start = match.end()
        spans.append((start, len(text)))
        spans = [(s, e) for s, e in spans if text[s:e].strip()] or [(0, len(text))]
        lengths = [len(e.ids) for e in
                   self.whole.encode_batch([text[s:e] for s, e in spans], add_special_tokens=False)]
        packed: list[tuple[int, int]] = []
        used = 0
        for (s, e), n in zip(spans, lengths, strict=True):
            if packed and used + n <= self.max_tokens:
                packed[-1] = (packed[-1][0], e)
                used += n
            else:
                packed.append((s, e))
                used = n
        out = []
        for s, e in packed:
            out += self._windows(text[s:e], self.windows.encode(text[s:e]), shift=s)
        return out


def _text_span(encoding: Any) -> tuple[int, int] | None:
    """The character span of an encoding's non-special tokens."""
    real = [o for o, special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True)
            if not special]
    return (real[0][0], real[-1][1]) if real else None


def chunk_type(vector: pa.DataType, name: str) -> pa.DataType:
    """A row's chunks: their index, character span and vector (in the column ``name``)."""
    return pa.list_(pa.struct([("chunk_index", pa.int32()), ("chunk_start", pa.int64()),
                               ("chunk_end", pa.int64()), (name, vector)]))


def chunk_lists(chunks: list[list[Chunk]], vectors: pa.Array, vector: pa.DataType,
                name: str) -> pa.Array:
    """A list of chunk structs per row, ``vectors`` holding every row's chunks in order."""
    counts = np.fromiter((len(c) for c in chunks), np.int32, count=len(chunks))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = [c for row in chunks for c in row]
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
    fields = pa.StructArray.from_arrays(
        [pa.array(index, pa.int32()),
         pa.array([c.start for c in flat], pa.int64()),
         pa.array([c.end for c in flat], pa.int64()), vectors.cast(vector)],
        names=["chunk_index", "chunk_start", "chunk_end", name])
    return pa.ListArray.from_arrays(pa.array(offsets), fields)


def explode(table: pa.Table, column: str = CHUNK_COLUMN) -> pa.Table:
    """A row per chunk: the other columns repeated, the chunk's fields as columns. A row whose
    list is null (a bad row) stays one row, with null chunk fields."""
    lists = table[column].combine_chunks()
    nulls = lists.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    rows_out = np.where(nulls, 1, lengths)
    parents = np.repeat(np.arange(table.num_rows), rows_out)
    rest = table.drop_columns([column]).take(pa.array(parents, pa.int64()))
    kind = lists.type.value_type
    values = pc.list_flatten(lists)  # in row order, null lists left out
    from_null = np.repeat(nulls, rows_out)
    position = np.full(len(parents), -1, dtype=np.int64)
    position[~from_null] = np.arange(len(values))
    index = pa.array(position, mask=from_null)
    out = rest
    for i, field in enumerate(kind):
        out = out.append_column(field.name, values.field(i).take(index))
    return out

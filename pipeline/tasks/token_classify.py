"""Token classification (NER, PII): a text's entities with their character offsets.

Texts are tokenized with offsets, batched by length like embed, and the model's
``[rows, tokens, labels]`` logits become entities as transformers' pipeline makes them
(``pipeline.tasks.entities``). A text longer than max_length is truncated (the default,
counted in the report) or, with ``long_texts: stride``, run as overlapping windows of
max_length tokens sharing ``stride`` tokens, all in one batch, their entities merged.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError, ModelError
from pipeline.tasks.base import Batch, Prepared, Task, softmax
from pipeline.tasks.entities import EntityReader, merge_windows
from pipeline.tasks.text import TextEncoder, task_tokenizer

ENTITY_TYPE = pa.struct([("entity_group", pa.string()), ("score", pa.float32()),
                         ("word", pa.string()), ("start", pa.int64()), ("end", pa.int64())])


class TokenClassifyTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        if bspec.text is None or not bspec.needs_tokenizer() or "logits" not in bspec.outputs \
                or not bspec.labels:
            raise ConfigError(f"task.kind: token-classify needs a token classifier bundle "
                              f"(token inputs, outputs.logits, labels), {bundle.uri} is not")
        tokenizer, max_length = task_tokenizer(bundle, spec)
        self.windows = spec.long_texts == "stride"
        if self.windows:
            room = max_length - tokenizer.num_special_tokens_to_add(False)
            if spec.stride >= room:
                raise ConfigError(f"task.stride: {spec.stride} tokens must be fewer than the "
                                  f"{room} a window of max_length {max_length} holds")
            tokenizer.enable_truncation(max_length, stride=spec.stride, strategy="longest_first")
        self.encoder = TextEncoder(tokenizer, bspec.inputs, keep_empty=True)
        self.reader = EntityReader(tokenizer, list(bspec.labels), spec.aggregation,
                                   list(spec.ignore_labels))

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.text_column]

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_column, pa.list_(ENTITY_TYPE))])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["logits"]]

    def prepare(self, table: pa.Table) -> Prepared:
        column = self.spec.text_column
        rows, texts, bad = self.encoder.valid_texts(table[column], column)
        text_of = dict(zip(rows, texts, strict=True))  # before encode() drops failed rows
        rows, encodings = self.encoder.encode(rows, texts, bad)
        windows = [[e, *e.overflowing] if self.windows else [e] for e in encodings]
        most = self.spec.max_windows
        for row, w in zip(rows, windows, strict=True):
            if len(w) > most:  # its windows run in one model call: bounded
                bad[row] = f"{column} makes {len(w)} windows, more than task.max_windows ({most})"
        kept = [(r, w) for r, w in zip(rows, windows, strict=True) if r not in bad]
        rows, windows = [r for r, _ in kept], [w for _, w in kept]
        notes = {} if self.windows else self.encoder.truncated(encodings)
        meta = [(text_of[r], w) for r, w in zip(rows, windows, strict=True)]
        return Prepared(batches=self.encoder.grouped_batches(rows, windows, meta,
                                                             self.batching.max_rows,
                                                             self.batching.max_tokens),
                        bad=bad, notes=notes)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        logits = np.asarray(outputs[0], dtype=np.float32)
        if logits.ndim != 3 or logits.shape[-1] != len(self.reader.labels):
            raise ModelError(f"task.kind: token-classify needs logits [rows, tokens, "
                             f"{len(self.reader.labels)}], the model gives {list(logits.shape)}")
        probabilities = softmax(logits)
        finite = np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
        values, bad = [], {}
        spans = batch.spans if batch.spans is not None else np.arange(len(batch) + 1)
        for i, row in enumerate(batch.rows):
            lo, hi = int(spans[i]), int(spans[i + 1])
            if not finite[lo:hi].all():
                bad[int(row)] = "model produced non-finite values"
                continue
            text, windows = batch.meta[i]
            found = []
            for f, window in zip(range(lo, hi), windows, strict=True):
                n = len(window.ids)
                tokens = self.reader.tokens(text, window.ids, window.offsets,
                                            window.special_tokens_mask, probabilities[f, :n])
                found.extend(self.reader.entities(text, tokens))
            if len(windows) > 1:
                found = merge_windows(found)
            values.append([e.as_dict() for e in found])
        return {self.spec.output_column: pa.array(values, pa.list_(ENTITY_TYPE))}, bad


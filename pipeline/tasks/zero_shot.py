"""Zero-shot classification: an NLI model labels each text with classes chosen by the job.

As ``transformers.pipeline("zero-shot-classification")`` computes it: each text is paired
with ``template.format(label)`` for every label, each pair encoded alone with only the text
truncated, and scored by the NLI model. The entailment label is found by name (the first whose
name starts with "entail"); contradiction is index 0 (or the last, when entailment is 0).
Single-label: a softmax of the entailment logits over the labels. Multi-label (or a single
label): for each label, a softmax over its [contradiction, entailment] logits. A text's pairs
run in one batch, batched by token budget like rerank.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError, ModelError
from pipeline.tasks.base import Batch, Prepared, softmax
from pipeline.tasks.text import TextEncoder, task_tokenizer, truncation_note
from pipeline.tasks.zero_shot_image import ZeroShotOutputs, zero_shot_columns

NLI_TEMPLATE = "This example is {}."  # the pipeline's hypothesis_template


def entailment_index(labels: list[str]) -> int | None:
    return next((i for i, name in enumerate(labels) if name.lower().startswith("entail")), None)


class ZeroShotTask(ZeroShotOutputs):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        if bspec.text is None or not bspec.needs_tokenizer() or "logits" not in bspec.outputs:
            raise ConfigError(f"task.kind: zero-shot needs a text classifier bundle (token "
                              f"inputs, outputs.logits), {bundle.uri} is not")
        nli = list(bspec.labels or [])
        entail = entailment_index(nli)
        if entail is None:
            raise ConfigError(f"task.kind: zero-shot needs an NLI model whose labels name "
                              f"entailment; {bundle.uri} has labels {nli}")
        self.entail, self.contradiction = entail, (len(nli) - 1 if entail == 0 else 0)
        self.nli_width = len(nli)
        tokenizer, max_length = task_tokenizer(bundle, spec)
        tokenizer.enable_truncation(max_length, strategy="only_first")  # never the hypothesis
        self.encoder = TextEncoder(tokenizer, bspec.inputs, keep_empty=False)
        self.hypotheses = [(spec.template or NLI_TEMPLATE).format(label)
                           for label in spec.labels]

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.text_column]

    def prepare(self, table: pa.Table) -> Prepared:
        column = self.spec.text_column
        rows, texts, bad = self.encoder.valid_texts(table[column], column)
        pairs = [(text, hypothesis) for text in texts for hypothesis in self.hypotheses]
        owners = [row for row in rows for _ in self.hypotheses]
        kept, encodings = self.encoder.encode(owners, pairs, bad)
        groups: dict[int, list] = {}
        for row, encoding in zip(kept, encodings, strict=True):
            groups.setdefault(row, []).append(encoding)
        whole = [r for r in rows if r not in bad and len(groups.get(r, ())) == len(self.hypotheses)]
        cut = sum(1 for r in whole if any(e.overflowing for e in groups[r]))
        notes = {truncation_note(self.encoder.max_length): cut} if cut else {}
        batches = self.encoder.grouped_batches(whole, [groups[r] for r in whole], None,
                                               self.batching.max_rows, self.batching.max_tokens)
        return Prepared(batches=batches, bad=bad, notes=notes)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        logits = np.asarray(outputs[0], dtype=np.float32)
        if logits.ndim != 2 or logits.shape[1] != self.nli_width:
            raise ModelError(f"task.kind: zero-shot needs logits [pairs, {self.nli_width}], the "
                             f"model gives {list(logits.shape)}")
        per_row = logits.reshape(len(batch), len(self.hypotheses), self.nli_width)
        if self.spec.multi_label or len(self.hypotheses) == 1:
            pair = per_row[..., [self.contradiction, self.entail]]
            scores = softmax(pair)[..., 1]
        else:
            scores = softmax(per_row[..., self.entail])
        finite = np.isfinite(scores).all(axis=1)
        bad = {int(r): "model produced non-finite values" for r in batch.rows[~finite]}
        return zero_shot_columns(self.spec, scores[finite]), bad


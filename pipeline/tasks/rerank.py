"""Reranking: a cross-encoder's relevance score for each (text, text_pair) row.

The two texts are tokenized together and cut longest side first to ``max_length``; rows are
batched like embed (length-sorted, by token budget). The score is the model's single logit,
or its sigmoid where the bundle says so (``rerank.activation``: sentence-transformers'
CrossEncoder config names it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError, ModelError
from pipeline.tasks.base import Batch, Prepared, Task, nonfinite_rows, split_good
from pipeline.tasks.text import TextEncoder, task_tokenizer


class RerankTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        if bspec.text is None or not bspec.needs_tokenizer() or "logits" not in bspec.outputs:
            raise ConfigError(f"task.kind: rerank needs a cross-encoder bundle (token inputs, "
                              f"outputs.logits), {bundle.uri} is not")
        self.activation = bspec.rerank.activation if bspec.rerank else "identity"
        self.encoder = TextEncoder(task_tokenizer(bundle, spec)[0], bspec.inputs,
                                   keep_empty=False)

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.text_column, self.spec.pair_column]

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.score_column, pa.float32())])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["logits"]]

    def prepare(self, table: pa.Table) -> Prepared:
        first, second = self.spec.text_column, self.spec.pair_column
        return self.encoder.prepare_pairs(table[first], first, table[second], second,
                                          self.batching.max_rows, self.batching.max_tokens)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        logits = np.asarray(outputs[0], dtype=np.float32).reshape(len(batch), -1)
        if logits.shape[1] != 1:
            raise ModelError(f"task.kind: rerank needs one logit per pair, the model gives "
                              f"{logits.shape[1]} (a classifier: use task.kind classify)")
        scores = logits[:, 0]
        if self.activation == "sigmoid":
            with np.errstate(over="ignore"):  # exp(-(-1000)) is inf: the score is 0, rightly
                scores = (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)
        bad_mask = nonfinite_rows(scores[:, None])
        bad = split_good(batch, bad_mask, "model produced non-finite values")
        return {self.spec.score_column: pa.array(scores[~bad_mask], pa.float32())}, bad

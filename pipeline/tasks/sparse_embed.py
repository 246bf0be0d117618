"""Sparse embeddings (SPLADE): each text's nonzero vocabulary weights, indices ascending, as
sentence-transformers' ``SparseEncoder.encode`` gives them.

The pooling runs inside the graph (fused at import: ``pipeline.models.sparse_pooling``), so a
batch comes back as ``[rows, vocab]``. onnxruntime still holds the ``[rows, tokens, vocab]``
logits and a few temporaries of that size while it pools, so the token budget of a batch is
capped to keep them within ``SPARSE_BATCH_BYTES``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.tasks.base import Batch, Prepared, Task, nonfinite_rows, split_good
from pipeline.tasks.text import TextEncoder, task_tokenizer

SPARSE_TYPE = pa.struct([("indices", pa.list_(pa.int32())), ("values", pa.list_(pa.float32()))])
SPARSE_BATCH_BYTES = 512 << 20
# float32 tensors of [tokens, vocab] onnxruntime holds at once while it pools (logits, the
# masked and activated copies); measured on the conformance model, with margin.
LIVE_COPIES = 4


class SparseEmbedTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        bspec = bundle.spec
        if bspec.text is None or bspec.sparse is None or "embedding" not in bspec.outputs:
            raise ConfigError(f"task.kind: sparse-embed needs a SPLADE bundle (token inputs, "
                              f"a sparse section), {bundle.uri} is not")
        cap = max(1, SPARSE_BATCH_BYTES // (bspec.sparse.dim * 4 * LIVE_COPIES))
        if batching.max_tokens > cap:
            batching = batching.model_copy(update={"max_tokens": cap})
        super().__init__(bundle, spec, batching, input_types, storage_options)
        self.encoder = TextEncoder(task_tokenizer(bundle, spec)[0], bspec.inputs,
                                   keep_empty=spec.empty_text == "embed")

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.text_column]

    @property
    def output_schema(self) -> pa.Schema:
        return pa.schema([(self.spec.output_column, SPARSE_TYPE)])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["embedding"]]

    def prepare(self, table: pa.Table) -> Prepared:
        return self.encoder.prepare(table[self.spec.text_column], self.spec.text_column,
                                    self.batching.max_rows, self.batching.max_tokens)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        weights = np.asarray(outputs[0], dtype=np.float32)
        bad_mask = nonfinite_rows(weights)
        bad = split_good(batch, bad_mask, "model produced non-finite values")
        weights = weights[~bad_mask]
        if self.spec.max_active_dims:
            weights = _top(weights, self.spec.max_active_dims)
        return {self.spec.output_column: sparse_rows(weights)}, bad


def _top(weights: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` largest weights, the rest zeroed (SparseEncoder's max_active_dims)."""
    if k >= weights.shape[1]:
        return weights
    keep = np.argpartition(-weights, k - 1, axis=1)[:, :k]
    out = np.zeros_like(weights)
    np.put_along_axis(out, keep, np.take_along_axis(weights, keep, axis=1), axis=1)
    return out


def sparse_rows(weights: np.ndarray) -> pa.Array:
    """``[rows, vocab]`` weights as one struct of indices and values per row, nonzeros only."""
    rows, columns = np.nonzero(weights)  # row-major: each row's indices come out ascending
    offsets = np.zeros(len(weights) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(weights)), out=offsets[1:])
    indices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(columns.astype(np.int32)))
    values = pa.ListArray.from_arrays(pa.array(offsets),
                                      pa.array(weights[rows, columns].astype(np.float32)))
    return pa.StructArray.from_arrays([indices, values], fields=list(SPARSE_TYPE))

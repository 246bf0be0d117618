"""Embedding: one fixed-size float32 vector per row, from text or from an image."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.tasks.base import Batch, Prepared, Task, fixed_size_list, nonfinite_rows, split_good
from pipeline.tasks.images import image_encoder
from pipeline.tasks.text import TextEncoder, load_tokenizer


class EmbedTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        self.embedding = bundle.spec.embedding
        self.images = None
        if self.embedding is not None:
            self._check_output_options()
        if bundle.spec.takes_images() and self.embedding is not None:
            self.images = image_encoder(bundle, input_types, storage_options)
            return
        text = bundle.spec.text
        if text is None or bundle.spec.embedding is None:
            raise ConfigError(f"task.kind: embed needs a text or image embedding bundle, "
                              f"{bundle.uri} is not")
        max_length = spec.max_length or text.max_length
        if max_length > text.max_length:
            raise ConfigError(
                f"task.max_length: {max_length} exceeds the bundle's max_length {text.max_length}"
            )
        self.encoder = TextEncoder(
            load_tokenizer(str(bundle.tokenizer_path), max_length),
            bundle.spec.inputs,
            keep_empty=spec.empty_text == "embed",
        )

    def _check_output_options(self) -> None:
        dims, dim = self.spec.dimensions, self.embedding.dim
        if dims is not None and dims > dim:
            raise ConfigError(f"task.dimensions: {dims} exceeds the model's {dim}")
        if self.spec.quantize == "int8" and not self.embedding.normalize:
            raise ConfigError("task.quantize: int8 scales unit vectors by 127; this model's "
                              "vectors are not normalized (use binary, or no quantize)")

    @property
    def dims(self) -> int:
        return self.spec.dimensions or self.embedding.dim

    @property
    def input_columns(self) -> list[str]:
        return [self.spec.image_column if self.images else self.spec.text_column]

    @property
    def output_schema(self) -> pa.Schema:
        if self.spec.quantize == "int8":
            return pa.schema([(self.spec.output_column, pa.list_(pa.int8(), self.dims))])
        if self.spec.quantize == "binary":
            return pa.schema([(self.spec.output_column,
                               pa.list_(pa.uint8(), (self.dims + 7) // 8))])
        return pa.schema([(self.spec.output_column, pa.list_(pa.float32(), self.dims))])

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["embedding"]]

    def prepare(self, table: pa.Table) -> Prepared:
        if self.images:
            column = self.spec.image_column
            return self.images.prepare(table[column], column, self.batching.max_rows)
        return self.encoder.prepare(table[self.spec.text_column], self.spec.text_column,
                                    self.batching.max_rows, self.batching.max_tokens)

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        vectors = self.pool(np.asarray(outputs[0], dtype=np.float32), batch)
        bad_mask = nonfinite_rows(vectors)
        bad = split_good(batch, bad_mask, "model produced non-finite values")
        return {self.spec.output_column: self.shaped(vectors[~bad_mask])}, bad

    def shaped(self, vectors: np.ndarray) -> pa.Array:
        """The vectors as the job asks: cut to ``dimensions`` (re-normalized when the model
        normalizes), then quantized."""
        if self.spec.dimensions is not None:
            vectors = vectors[:, :self.spec.dimensions]
            if self.embedding.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True),
                                               1e-12)
        if self.spec.quantize == "int8":
            codes = np.clip(np.rint(vectors * 127), -127, 127).astype(np.int8)
            return pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), self.dims)
        if self.spec.quantize == "binary":
            packed = np.packbits(vectors > 0, axis=1)
            return pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1)),
                                                     packed.shape[1])
        return fixed_size_list(vectors)

    def pool(self, out: np.ndarray, batch: Batch) -> np.ndarray:
        if self.embedding.pooling == "in_graph":
            return out
        if self.embedding.pooling == "cls":
            pooled = out[:, 0, :]
        elif self.images:  # patch tokens: every one counts
            pooled = out.mean(axis=1)
        else:
            mask_name = next(n for n, s in self.bundle.spec.inputs.items()
                             if s == "tokens.attention_mask")
            mask = batch.feeds[mask_name][:, :, None].astype(np.float32)
            pooled = (out * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.embedding.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

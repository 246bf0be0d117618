"""Embedding: one fixed-size float32 vector per row, from text or from an image; or, with
``chunking``, one per chunk of a long text (a row per chunk, or their mean per text)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.tasks.base import Batch, Prepared, Task, fixed_size_list, nonfinite_rows, split_good
from pipeline.tasks.chunking import CHUNK_COLUMN, Chunker, chunk_lists, chunk_type
from pipeline.tasks.images import image_encoder
from pipeline.tasks.text import TextEncoder, task_tokenizer


class EmbedTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        self.embedding = bundle.spec.embedding
        self.images = None
        self.chunker: Chunker | None = None
        if self.embedding is not None:
            self._check_output_options()
        if bundle.spec.takes_images() and self.embedding is not None:
            if spec.chunking is not None:
                raise ConfigError("task.chunking: cuts texts; this is an image embedding bundle")
            self.images = image_encoder(bundle, input_types, storage_options)
            return
        text = bundle.spec.text
        if text is None or bundle.spec.embedding is None:
            raise ConfigError(f"task.kind: embed needs a text or image embedding bundle, "
                              f"{bundle.uri} is not")
        tokenizer, max_length = task_tokenizer(bundle, spec)
        self.encoder = TextEncoder(tokenizer, bundle.spec.inputs,
                                   keep_empty=spec.empty_text == "embed")
        if spec.chunking is not None:
            self._chunker(spec.chunking, max_length)

    def _chunker(self, chunking, max_length: int) -> None:
        room = max_length - self.encoder.tokenizer.num_special_tokens_to_add(False)
        tokens = chunking.max_tokens or room
        if tokens > room:
            raise ConfigError(f"task.chunking.max_tokens: {tokens} tokens of text and the "
                              f"special tokens exceed max_length {max_length} (at most {room})")
        if chunking.overlap >= tokens:
            raise ConfigError(f"task.chunking.overlap: {chunking.overlap} must be smaller than "
                              f"the {tokens} tokens of a chunk")
        self.chunker = Chunker(self.encoder.tokenizer, tokens, chunking.overlap, chunking.by)
        self.explodes = CHUNK_COLUMN if chunking.pool == "none" else None

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
    def vector_type(self) -> pa.DataType:
        if self.spec.quantize == "int8":
            return pa.list_(pa.int8(), self.dims)
        if self.spec.quantize == "binary":
            return pa.list_(pa.uint8(), (self.dims + 7) // 8)
        return pa.list_(pa.float32(), self.dims)

    @property
    def output_schema(self) -> pa.Schema:
        vector = (self.spec.output_column, self.vector_type)
        if self.explodes:
            return pa.schema([("chunk_index", pa.int32()), ("chunk_start", pa.int64()),
                              ("chunk_end", pa.int64()), vector])
        return pa.schema([vector])

    @property
    def row_schema(self) -> pa.Schema:
        if self.explodes:
            return pa.schema([(CHUNK_COLUMN, chunk_type(self.vector_type,
                                                         self.spec.output_column))])
        return self.output_schema

    @property
    def output_names(self) -> list[str]:
        return [self.bundle.spec.outputs["embedding"]]

    def prepare(self, table: pa.Table) -> Prepared:
        if self.chunker is not None:
            return self._prepare_chunks(table)
        if self.images:
            column = self.spec.image_column
            return self.images.prepare(table[column], column, self.batching.max_rows)
        return self.encoder.prepare(table[self.spec.text_column], self.spec.text_column,
                                    self.batching.max_rows, self.batching.max_tokens)

    def _prepare_chunks(self, table: pa.Table) -> Prepared:
        column = self.spec.text_column
        rows, texts, bad = self.encoder.valid_texts(table[column], column)
        chunked = self.chunker.chunks(texts)
        most = self.spec.chunking.max_chunks
        kept = [(r, c) for r, c in zip(rows, chunked, strict=True) if len(c) <= most]
        for r, c in zip(rows, chunked, strict=True):
            if len(c) > most:
                bad[r] = f"{column} makes {len(c)} chunks, more than chunking.max_chunks ({most})"
        batches = self.encoder.grouped_batches(
            [r for r, _ in kept], [[c.encoding for c in chunks] for _, chunks in kept],
            [chunks for _, chunks in kept], self.batching.max_rows, self.batching.max_tokens)
        return Prepared(batches=batches, bad=bad)

    def _finish_chunks(self, batch: Batch, vectors: np.ndarray):
        """Each row's chunk vectors: a list of chunk structs per row, or their mean."""
        broken = nonfinite_rows(vectors)
        bad, good, chunks = {}, [], []
        for i, row in enumerate(batch.rows):
            lo, hi = int(batch.spans[i]), int(batch.spans[i + 1])
            failed = np.flatnonzero(broken[lo:hi])
            if len(failed):
                chunk = batch.meta[i][failed[0]]
                bad[int(row)] = (f"chunk {failed[0]} (characters {chunk.start}-{chunk.end}): "
                                 "model produced non-finite values")
                continue
            good.append(i)
            chunks.append(batch.meta[i])
        if self.explodes is None:  # pool: mean, one vector per text
            means = np.stack([vectors[batch.spans[i]:batch.spans[i + 1]].mean(axis=0)
                              for i in good]) if good else np.zeros((0, vectors.shape[1]))
            if self.embedding.normalize:
                means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
            return {self.spec.output_column: self.shaped(means)}, bad
        picked = np.concatenate([np.arange(batch.spans[i], batch.spans[i + 1]) for i in good]) \
            if good else np.zeros(0, dtype=np.int64)
        return {CHUNK_COLUMN: chunk_lists(chunks, self.shaped(vectors[picked]),
                                          self.vector_type, self.spec.output_column)}, bad

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        vectors = self.pool(np.asarray(outputs[0], dtype=np.float32), batch)
        if self.chunker is not None:
            return self._finish_chunks(batch, vectors)
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

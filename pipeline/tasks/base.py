"""The task contract shared by embed, classify and tensor."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError


@dataclass
class Batch:
    rows: np.ndarray  # positions in the input table, one per batch row
    feeds: dict[str, np.ndarray]
    # Rows fed as several model rows (a long text's windows): row i's are feed rows
    # spans[i]:spans[i + 1]. None: one model row per row.
    spans: np.ndarray | None = None
    meta: list[Any] | None = None  # what finish() needs of each row (offsets, say)

    def subset(self, idx: slice) -> Batch:
        meta = self.meta[idx] if self.meta is not None else None
        if self.spans is None:
            return Batch(self.rows[idx], {k: v[idx] for k, v in self.feeds.items()}, None, meta)
        start, stop, _ = idx.indices(len(self.rows))
        lo, hi = int(self.spans[start]), int(self.spans[stop])
        return Batch(self.rows[idx], {k: v[lo:hi] for k, v in self.feeds.items()},
                     self.spans[start:stop + 1] - lo, meta)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Prepared:
    # A list, or an iterator that prepares batches as they are consumed (images); ``bad`` is
    # complete once they all were.
    batches: Iterable[Batch]
    bad: dict[int, str] = field(default_factory=dict)  # row position -> reason
    # Rows scored with a caveat the report counts (texts cut at max_length): note -> rows.
    notes: dict[str, int] = field(default_factory=dict)


class Task(ABC):
    """prepare(table) -> batches of model inputs; finish(batch, outputs) -> output columns."""

    def __init__(self, bundle: Any, spec: Any, batching: Any, input_types: dict[str, str],
                 storage_options: dict[str, Any] | None = None):
        self.bundle = bundle
        self.spec = spec
        self.batching = batching
        self.input_types = input_types
        self.storage_options = storage_options or {}  # opens image files a path column names

    def with_max_rows(self, rows: int) -> Task:
        """This task with batches of at most ``rows`` rows, and its token budget and windows
        cut in proportion: a shard that ran its worker out of memory is retried with it."""
        b = self.batching
        scale = min(1.0, rows / b.max_rows)
        smaller = copy.copy(self)  # shares the tokenizer or decoder, as threads already do
        smaller.batching = b.model_copy(update={
            "max_rows": max(1, min(rows, b.max_rows)),
            "max_tokens": max(1, int(b.max_tokens * scale)),
            "window_rows": max(1, min(b.window_rows, int(b.window_rows * scale) + 1))})
        return smaller

    @property
    @abstractmethod
    def input_columns(self) -> list[str]:
        """Input columns the task reads."""

    @property
    @abstractmethod
    def output_schema(self) -> pa.Schema:
        """Columns the task adds."""

    @property
    def row_schema(self) -> pa.Schema:
        """What finish() returns per input row: the output schema, or for a task that writes
        several rows per input row (chunks), one list column that ``explodes`` names."""
        return self.output_schema

    explodes: str | None = None  # the row_schema column that becomes rows (chunks)
    def run_model(self, session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs finish() reads for a batch's feeds: one call of the graph. A task that
        overrides it (a generation loop, inputs fed beside every batch) runs unbound on GPUs."""
        return session.run(self.output_names, feeds)

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """Graph outputs to fetch, in the order finish() expects them."""

    @abstractmethod
    def prepare(self, table: pa.Table) -> Prepared: ...

    @abstractmethod
    def finish(self, batch: Batch, outputs: list[np.ndarray]) -> tuple[dict[str, pa.Array], dict[int, str]]:
        """Columns for the good rows of ``batch`` and reasons for rows whose output is unusable.

        The columns hold one value per row of ``batch`` not in the returned bad rows.
        """

    def check_columns(self, schema: pa.Schema, where: str) -> None:
        missing = [c for c in self.input_columns if c not in schema.names]
        if missing:
            raise ConfigError(
                f"{where}: column {missing[0]!r} needed by the task is not in the input "
                f"(columns: {', '.join(schema.names[:20])})"
            )


def fixed_size_list(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def softmax(values: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its max (no overflow)."""
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def nonfinite_rows(matrix: np.ndarray) -> np.ndarray:
    flat = matrix.reshape(len(matrix), -1)
    return ~np.isfinite(flat).all(axis=1)


def split_good(batch: Batch, bad_mask: np.ndarray, reason: str) -> dict[int, str]:
    return {int(r): reason for r in batch.rows[bad_mask]}


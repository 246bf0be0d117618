"""Classification: label, score and class probabilities per row, from features, text or an
image."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError, ModelError
from pipeline.models.bundle import TEXT_SOURCE
from pipeline.models.onnx_types import file_signature
from pipeline.tasks.base import Batch, Prepared, Task, fixed_size_list, nonfinite_rows, split_good
from pipeline.tasks.images import image_encoder
from pipeline.tasks.text import TextEncoder, task_tokenizer, valid_texts


class ClassifyTask(Task):
    def __init__(self, bundle, spec, batching, input_types, storage_options=None):
        super().__init__(bundle, spec, batching, input_types, storage_options)
        bspec = bundle.spec
        self.text_input = bspec.needs_tokenizer() or bspec.takes_raw_text()
        self.labels = list(bspec.labels or [])
        self.use_logits = "probabilities" not in bspec.outputs
        self.images = None
        self.raw_text: str | None = None  # the string input fed the text as it is
        self.features: list[str] = []
        if bspec.takes_raw_text():
            if not spec.text_column:
                raise ConfigError("task.text_column: required for a text classifier bundle")
            self.raw_text = next(n for n, s in bspec.inputs.items() if s == TEXT_SOURCE)
            dims = file_signature(bundle.model_path, bundle.sha256).input(self.raw_text).dims
            self.raw_shape = (-1, 1) if dims is not None and len(dims) == 2 else (-1,)
        elif bspec.takes_images():
            self.images = image_encoder(bundle, input_types, storage_options)
        elif self.text_input:
            if not spec.text_column:
                raise ConfigError("task.text_column: required for a text classifier bundle")
            if bspec.text is None:
                raise ConfigError(f"model.uri: {bundle.uri} has token inputs but no 'text' section")
            self.encoder = TextEncoder(task_tokenizer(bundle, spec)[0], bspec.inputs,
                                       keep_empty=spec.empty_text == "embed")
        else:
            self.feature_count = len(bspec.features) if bspec.features else bspec.feature_count
            names = spec.feature_columns or bspec.features
            self.features = []
            if names:
                self.bind_features(list(names))
            self.feature_input = next(n for n, s in bspec.inputs.items() if s == "features")
            self.feature_dtype = np.float64 if input_types.get(self.feature_input) == \
                "tensor(double)" else np.float32

    def bind_features(self, names: list[str]) -> None:
        """The input columns that feed the model's features, in its order."""
        if self.feature_count is not None and len(names) != self.feature_count:
            raise ConfigError(f"task.feature_columns: {len(names)} columns given, the bundle "
                              f"expects {self.feature_count} features")
        self.features = list(names)

    @property
    def needs_feature_names(self) -> bool:
        """A model whose converter kept no feature names, and none given yet."""
        return not self.text_input and not self.images and not self.features

    @property
    def input_columns(self) -> list[str]:
        if self.images:
            return [self.spec.image_column]
        return [self.spec.text_column] if self.text_input else self.features

    @property
    def output_schema(self) -> pa.Schema:
        fields = [(self.spec.label_column, pa.string()), (self.spec.score_column, pa.float32())]
        if self.spec.probabilities_column:
            probs = pa.list_(pa.float32(), len(self.labels)) if self.labels else pa.list_(pa.float32())
            fields.append((self.spec.probabilities_column, probs))
        return pa.schema(fields)

    @property
    def output_names(self) -> list[str]:
        outputs = self.bundle.spec.outputs
        return [outputs["logits"] if self.use_logits else outputs["probabilities"]]

    def prepare(self, table: pa.Table) -> Prepared:
        if self.needs_feature_names:
            self.bind_features(feature_columns_from(table.column_names, [], self.feature_count,
                                                    "the input"))
        if self.images:
            column = self.spec.image_column
            return self.images.prepare(table[column], column, self.batching.max_rows)
        if self.raw_text:
            return self._raw_texts(table)
        if self.text_input:
            return self.encoder.prepare(table[self.spec.text_column], self.spec.text_column,
                                        self.batching.max_rows, self.batching.max_tokens)
        matrix, bad = self._feature_matrix(table)
        good = np.array([i for i in range(table.num_rows) if i not in bad], dtype=np.int64)
        step = self.batching.max_rows
        batches = [Batch(good[i:i + step], {self.feature_input: matrix[good[i:i + step]]})
                   for i in range(0, len(good), step)]
        return Prepared(batches=batches, bad=bad)

    def _raw_texts(self, table: pa.Table) -> Prepared:
        """The text column as the model's string input takes it, rows in input order."""
        column = self.spec.text_column
        rows, texts, bad = valid_texts(table[column], column, self.spec.empty_text == "embed")
        good = np.asarray(rows, dtype=np.int64)
        values = np.array(texts, dtype=object).reshape(self.raw_shape)
        step = self.batching.max_rows
        return Prepared(batches=[Batch(good[i:i + step], {self.raw_text: values[i:i + step]})
                                 for i in range(0, len(good), step)], bad=bad)

    def _feature_matrix(self, table: pa.Table) -> tuple[np.ndarray, dict[int, str]]:
        matrix = np.zeros((table.num_rows, len(self.features)), dtype=self.feature_dtype)
        bad: dict[int, str] = {}
        for j, name in enumerate(self.features):
            column = table[name]
            if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) \
                    or pa.types.is_boolean(column.type):
                values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
                for i in np.flatnonzero(~np.isfinite(values)):
                    bad.setdefault(int(i), f"feature {name} is null or not finite")
            else:
                values = np.zeros(table.num_rows)
                for i, raw in enumerate(column.to_pylist()):
                    try:
                        values[i] = float(raw)
                        if not np.isfinite(values[i]):
                            raise ValueError
                    except (TypeError, ValueError):
                        bad.setdefault(i, f"feature {name}: {raw!r} is not a number")
            matrix[:, j] = np.nan_to_num(values)
        return matrix, bad

    def finish(self, batch: Batch, outputs: list[np.ndarray]):
        scores = np.asarray(outputs[0], dtype=np.float32)
        if scores.ndim != 2:
            raise ModelError(f"{self.bundle.uri}: task.kind classify needs scores [rows, labels], "
                             f"the model gives {list(scores.shape)}"
                             + (" (one per token: a token classifier, task.kind token-classify)"
                                if scores.ndim == 3 and self.text_input else ""))
        if self.use_logits:
            shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores = shifted / shifted.sum(axis=1, keepdims=True)
        bad_mask = nonfinite_rows(scores)
        bad = split_good(batch, bad_mask, "model produced non-finite values")
        probs = scores[~bad_mask]
        best = probs.argmax(axis=1)
        names = self.labels or [str(i) for i in range(probs.shape[1])]
        columns = {
            self.spec.label_column: pa.array([names[i] for i in best], pa.string()),
            self.spec.score_column: pa.array(probs.max(axis=1), pa.float32()),
        }
        if self.spec.probabilities_column:
            columns[self.spec.probabilities_column] = fixed_size_list(probs) if self.labels \
                else pa.array(list(probs), pa.list_(pa.float32()))
        return columns, bad


def feature_columns_from(columns: list[str], passthrough: list[str], count: int | None,
                         where: str) -> list[str]:
    """A nameless model's features: the input's columns other than passthrough, in their
    order, when there are exactly as many as it takes."""
    candidates = [c for c in columns if c not in passthrough]
    if count is not None and len(candidates) != count:
        raise ConfigError(f"task.feature_columns: {where} has {len(candidates)} columns besides "
                          f"passthrough, the model takes {count} features and its converter "
                          "kept no names; list them in task.feature_columns")
    return candidates

"""input.filter: Iceberg's row-filter grammar as pyarrow expressions, the parts that prune
files by partition values and statistics, and one-line errors (no storage, no Ray)."""

from __future__ import annotations

import datetime

import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline.sources.filters import (
    apply_filter,
    check_filter,
    conjuncts_over,
    filter_columns,
    outside,
    range_terms,
)

TABLE = pa.table({
    "id": pa.array([1, 2, 3, 4, None], pa.int64()),
    "lang": ["en", "de", "en", None, "fr"],
    "day": pa.array([datetime.date(2026, 11, 30), datetime.date(2026, 12, 1),
                     datetime.date(2026, 12, 2), None, datetime.date(2026, 12, 3)]),
    "score": [0.5, float("nan"), 1.5, 2.0, 0.1],
})


@pytest.mark.parametrize("text,ids", [
    ("lang = 'en' AND day >= '2026-12-01'", [3]),
    ("id IN (1, 4) OR lang = 'fr'", [1, 4, None]),
    ("NOT (id < 3)", [3, 4]),
    ("lang IS NULL", [4]),
    ("id IS NOT NULL AND lang != 'en'", [2]),
    ("lang LIKE 'e%'", [1, 3]),
    ("score IS NAN", [2]),
    ("id NOT IN (1, 2, 3)", [4]),
])
def test_rows_kept_as_sql_would(text, ids):
    assert apply_filter(TABLE, text)["id"].to_pylist() == ids


def test_columns_and_errors_name_the_key():
    assert filter_columns("lang = 'en' AND (id > 3 OR day < '2026-01-01')") == ["lang", "id", "day"]
    with pytest.raises(ConfigError, match=r"input\.filter: column 'nope' is not in the input"):
        check_filter("nope = 1", TABLE.column_names)
    with pytest.raises(ConfigError, match=r"input\.filter: cannot parse"):
        check_filter("id >>> 3", None)
    with pytest.raises(ConfigError, match=r"'x' is no value of column 'day'"):
        apply_filter(TABLE, "day >= 'x'")


def test_only_terms_that_cannot_drop_a_kept_row_prune():
    parts = pa.table({"lang": ["en", "de"]})
    expression = conjuncts_over("lang = 'en' AND id > 3", {"lang"}, parts.schema)
    assert parts.filter(expression)["lang"].to_pylist() == ["en"]
    assert conjuncts_over("lang = 'en' OR id > 3", {"lang"}, parts.schema) is None
    assert range_terms("id >= 20 AND lang = 'en'") == [("id", ">=", [20]), ("lang", "=", ["en"])]
    assert range_terms("id >= 20 OR id < 3") == []


@pytest.mark.parametrize("op,values,low,high,out", [
    ("=", [5], 1, 4, True), ("=", [4], 1, 4, False), (">=", [5], 1, 4, True),
    (">", [4], 1, 4, True), (">", [3], 1, 4, False), ("<", [1], 1, 4, True),
    ("<=", [1], 1, 4, False), ("in", [0, 9], 1, 4, True), ("in", [0, 2], 1, 4, False),
])
def test_file_statistics_rule_out_only_impossible_files(op, values, low, high, out):
    assert outside(op, values, low, high) is out

"""``input.filter``: which rows a job scores, as one SQL-like predicate for every source.

The syntax is Apache Iceberg's row-filter grammar (pyiceberg's parser), a SQL ``WHERE``
clause without functions: comparisons (``=``, ``!=``, ``<>``, ``<``, ``<=``, ``>``, ``>=``) of
a column with a literal, ``IN (...)``, ``NOT IN (...)``, ``IS NULL``, ``IS NOT NULL``,
``IS NAN``, ``LIKE 'prefix%'``, joined by ``AND``, ``OR``, ``NOT`` and parentheses. Strings
are in single quotes; a literal is cast to its column's type (``day >= '2026-12-01'`` compares
dates on a date column).

Iceberg inputs hand the same text to pyiceberg's scan planning (partitions and file
statistics prune data files); Delta inputs prune files by their partition values when the
filter names only partition columns. Workers then filter every row, whatever the source: a
row the filter excludes is never scored nor written.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigError


@lru_cache(maxsize=32)
def parse_filter(text: str) -> Any:
    """The filter as a pyiceberg expression; ConfigError (exit 2) naming the text if not."""
    try:
        from pyiceberg.expressions.parser import parse
    except ImportError as exc:
        raise ConfigError("input.filter needs the pyiceberg package, which is not installed "
                          "(pip install 'onnx-ray-pipeline[tables]')") from exc
    try:
        return parse(text)
    except Exception as exc:  # pyparsing's errors say where the text stopped making sense
        raise ConfigError(f"input.filter: cannot parse {text!r} ({str(exc).splitlines()[0]})"
                          ) from exc


def filter_columns(text: str | None) -> list[str]:
    """The columns a filter reads, in order of appearance."""
    if not text:
        return []
    found: list[str] = []
    _walk(parse_filter(text), found)
    return list(dict.fromkeys(found))


def _walk(node: Any, found: list[str]) -> None:
    term = getattr(node, "term", None)
    if term is not None:
        found.append(term.name)
    for child in ("left", "right", "child"):
        if hasattr(node, child):
            _walk(getattr(node, child), found)


def check_filter(text: str | None, columns: list[str] | None) -> None:
    """Exit 2 for a filter that does not parse or names a column the input lacks."""
    if not text:
        return
    names = filter_columns(text)
    if columns is not None:
        missing = [c for c in names if c not in columns]
        if missing:
            raise ConfigError(f"input.filter: column {missing[0]!r} is not in the input "
                              f"(has: {', '.join(columns[:15])})")


def to_arrow(text: str, schema: pa.Schema) -> pc.Expression:
    """The filter as a pyarrow compute expression over ``schema`` (literals cast to their
    columns' types)."""
    return _expr(parse_filter(text), schema)


def conjuncts_over(text: str, columns: set[str], schema: pa.Schema) -> pc.Expression | None:
    """The part of the filter that only reads ``columns`` (partition columns): the top-level
    AND terms naming no other column, as one expression; None when there is none. A row
    the filter keeps is always kept by it, so files it rejects can be pruned."""
    terms: list[Any] = []

    def split(node: Any) -> None:
        if type(node).__name__ == "And":
            split(node.left)
            split(node.right)
        else:
            terms.append(node)

    split(parse_filter(text))
    kept = []
    for term in terms:
        names: list[str] = []
        _walk(term, names)
        if names and set(names) <= columns:
            kept.append(_expr(term, schema))
    if not kept:
        return None
    expression = kept[0]
    for more in kept[1:]:
        expression = expression & more
    return expression


RANGE_KINDS = {"EqualTo": "=", "LessThan": "<", "LessThanOrEqual": "<=", "GreaterThan": ">",
               "GreaterThanOrEqual": ">=", "In": "in"}


def range_terms(text: str) -> list[tuple[str, str, list[Any]]]:
    """The filter's top-level AND terms that compare one column with literals, as
    (column, op, values): what file statistics (min, max) can rule out."""
    terms: list[tuple[str, str, list[Any]]] = []

    def split(node: Any) -> None:
        kind = type(node).__name__
        if kind == "And":
            split(node.left)
            split(node.right)
        elif kind == "In":
            terms.append((node.term.name, "in", [lit.value for lit in node.literals]))
        elif kind in RANGE_KINDS:
            terms.append((node.term.name, RANGE_KINDS[kind], [node.literal.value]))

    split(parse_filter(text))
    return terms


def outside(op: str, values: list[Any], low: Any, high: Any) -> bool:
    """True when no value in [low, high] can satisfy ``column <op> values``."""
    if op == "=":
        return values[0] < low or values[0] > high
    if op == "in":
        return all(v < low or v > high for v in values)
    return {"<": low >= values[0], "<=": low > values[0], ">": high <= values[0],
            ">=": high < values[0]}[op]


def apply_filter(table: pa.Table, text: str | None) -> pa.Table:
    if not text:
        return table
    return table.filter(to_arrow(text, table.schema)) if table.num_rows else table


def _literal(value: Any, name: str, schema: pa.Schema) -> pa.Scalar:
    target = schema.field(name).type
    try:
        return pa.scalar(value).cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ConfigError(f"input.filter: {value!r} is no value of column {name!r} "
                          f"({target})") from exc


def _expr(node: Any, schema: pa.Schema) -> pc.Expression:
    kind = type(node).__name__
    if kind == "AlwaysTrue":
        return pc.scalar(True)
    if kind == "AlwaysFalse":
        return pc.scalar(False)
    if kind == "And":
        return _expr(node.left, schema) & _expr(node.right, schema)
    if kind == "Or":
        return _expr(node.left, schema) | _expr(node.right, schema)
    if kind == "Not":
        return ~_expr(node.child, schema)
    name = node.term.name
    if name not in schema.names:
        raise ConfigError(f"input.filter: column {name!r} is not in the input "
                          f"(has: {', '.join(schema.names[:15])})")
    field = pc.field(name)
    if kind == "IsNull":
        return field.is_null()
    if kind == "NotNull":
        return field.is_valid()
    if kind == "IsNaN":
        return pc.is_nan(field)
    if kind == "NotNaN":
        return ~pc.is_nan(field)
    if kind in ("In", "NotIn"):
        values = pa.array([_literal(lit.value, name, schema).as_py() for lit in node.literals],
                          schema.field(name).type)
        found = pc.is_in(field, value_set=values)
        return found if kind == "In" else ~found & field.is_valid()  # SQL: NULL NOT IN (..)
    value = _literal(node.literal.value, name, schema)
    if kind in ("StartsWith", "NotStartsWith"):
        found = pc.starts_with(field, pattern=value.as_py())
        return found if kind == "StartsWith" else ~found
    compare = {"EqualTo": "equal", "NotEqualTo": "not_equal", "LessThan": "less",
               "LessThanOrEqual": "less_equal", "GreaterThan": "greater",
               "GreaterThanOrEqual": "greater_equal"}
    if kind not in compare:
        raise ConfigError(f"input.filter: {kind} is not supported")
    return pc.Expression._call(compare[kind], [field, pc.scalar(value)])

"""Dead-letter tables: the rows that could not be scored, with why.

One builder for every entry point: a job's worker writes them to
``_pipeline/dead_letter/<shard>.parquet`` (with where each row came from), ``OnnxPredictor``
to its ``dead_letter_uri``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa

REASON_COLUMN = "_reason"


Columns = Mapping[str, Callable[[list[int]], pa.Array]]  # name -> built from the row positions


def dead_letter_table(table: pa.Table, bad: Mapping[int, str], columns: Sequence[str] | None,
                      before_reason: Columns | None = None,
                      after_reason: Columns | None = None) -> pa.Table | None:
    """The rows of ``table`` named in ``bad`` (row position -> reason), in position order.

    Columns: those of ``columns`` that ``table`` has (all of them when None), the
    ``before_reason`` ones, ``_reason``, then the ``after_reason`` ones (each built from the
    sorted row positions). None when no row is bad.
    """
    if not bad:
        return None
    rows = sorted(bad)
    take = pa.array(rows, pa.int64())
    names = table.column_names if columns is None else \
        [c for c in dict.fromkeys(columns) if c in table.column_names]
    out = {name: table[name].take(take) for name in names}
    for name, make in (before_reason or {}).items():
        out[name] = make(rows)
    out[REASON_COLUMN] = pa.array([bad[r] for r in rows], pa.string())
    for name, make in (after_reason or {}).items():
        out[name] = make(rows)
    return pa.table(out)

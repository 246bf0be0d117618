"""Dead-letter tables: the rows that could not be scored, with why.

One builder for every entry point: a job's worker writes them to
``_pipeline/dead_letter/<shard>.parquet`` (with where each row came from), ``OnnxPredictor``
to its ``dead_letter_uri``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pyarrow as pa

REASON_COLUMN = "_reason"


def dead_letter_table(table: pa.Table, bad: Mapping[int, str], columns: Sequence[str] | None,
                      context: Mapping[str, Callable[[list[int]], pa.Array]] | None = None
                      ) -> pa.Table | None:
    """The rows of ``table`` named in ``bad`` (row position -> reason), in position order.

    Columns: those of ``columns`` that ``table`` has (all of them when None), then one column
    per ``context`` entry (built from the sorted row positions), then ``_reason``. None when
    no row is bad.
    """
    if not bad:
        return None
    rows = sorted(bad)
    take = pa.array(rows, pa.int64())
    names = table.column_names if columns is None else \
        [c for c in dict.fromkeys(columns) if c in table.column_names]
    out = {name: table[name].take(take) for name in names}
    for name, make in (context or {}).items():
        out[name] = make(rows)
    out[REASON_COLUMN] = pa.array([bad[r] for r in rows], pa.string())
    return pa.table(out)

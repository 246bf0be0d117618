"""The table demo: a Delta table of patients that changes every night.

``write_table_data`` makes version 0: the tabular demo rows, partitioned by ``site``.
``apply_night`` is one night of a live table: new patients appended, some withdrawn (a
delete, which rewrites the files holding them). ``make tables`` scores the table
incrementally before and after a night: the second run computes only the changed files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.demo.tabular import make_scoring_table

SITES = ("north", "south", "east", "west")


def _with_sites(table: pa.Table, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return table.append_column("site", pa.array(rng.choice(SITES, size=table.num_rows)))


def write_table_data(out: Path, rows: int) -> None:
    from deltalake import write_deltalake

    write_deltalake(str(out), _with_sites(make_scoring_table(rows, seed=0), seed=0),
                    partition_by=["site"], mode="overwrite")


def apply_night(out: Path) -> str:
    """Append a day's patients and delete a few withdrawn ones; returns what changed."""
    from deltalake import DeltaTable, write_deltalake

    table = DeltaTable(str(out))
    night = table.version() + 1
    ids = pa.table(table.to_pyarrow_table(columns=["id"]))["id"]
    start = int(pc.max(ids).as_py() or -1) + 1
    added = max(1, len(ids) // 20)
    write_deltalake(str(out), _with_sites(make_scoring_table(added, seed=night, start_id=start),
                                          seed=night), mode="append")
    withdrawn = [int(i) for i in np.random.default_rng(night).choice(start, size=3, replace=False)]
    DeltaTable(str(out)).delete(f"id in ({', '.join(map(str, withdrawn))})")
    return f"appended {added} patients, withdrew ids {withdrawn}"

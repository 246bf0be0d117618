"""Output sinks: where shards' rows go and how a run becomes visible (see ``base``).

Every sink module is imported here, up front, as every module of ours is (docs/architecture.md,
"Imports"): under ``ray job submit`` the job's working directory may be gone once the driver
has connected. The table libraries themselves (deltalake, lance: the ``tables`` extra) load
on first use.
"""

from __future__ import annotations

from pipeline.sinks.base import RunCommit, Sink
from pipeline.sinks.delta_sink import DeltaSink
from pipeline.sinks.lance_sink import LanceSink
from pipeline.sinks.parquet_sink import ParquetSink

__all__ = ["TABLE_DIRS", "RunCommit", "Sink", "sink_for"]

SINKS: dict[str, type] = {"parquet": ParquetSink, "delta": DeltaSink, "lance": LanceSink}
TABLE_DIRS = {fmt: sink().table_dirs() for fmt, sink in SINKS.items()}  # what --fresh wipes


def sink_for(fmt: str) -> Sink:
    return SINKS.get(fmt, ParquetSink)()

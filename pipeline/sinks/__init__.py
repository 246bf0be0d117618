"""Output sinks: where shards' rows go and how a run becomes visible (see ``base``).

Every sink module is imported here, up front, as every module of ours is (docs/architecture.md,
"Imports"): under ``ray job submit`` the job's working directory may be gone once the driver
has connected. The table libraries themselves (deltalake, lance: the ``tables`` extra) load
on first use.
"""

from __future__ import annotations

from pipeline.sinks.base import RunCommit, Sink
from pipeline.sinks.delta_sink import DeltaSink
from pipeline.sinks.iceberg_sink import IcebergSink
from pipeline.sinks.lance_sink import LanceSink
from pipeline.sinks.merge_sink import MergeSink
from pipeline.sinks.parquet_sink import ParquetSink
from pipeline.spec import OutputSpec

__all__ = ["TABLE_DIRS", "RunCommit", "Sink", "sink_for"]

SINKS: dict[str, type] = {"parquet": ParquetSink, "delta": DeltaSink, "lance": LanceSink,
                          "iceberg": IcebergSink}
TABLE_DIRS = {fmt: sink().table_dirs() for fmt, sink in SINKS.items()}  # what --fresh wipes


def sink_for(fmt: str, output: OutputSpec | None = None) -> Sink:
    """The sink of ``fmt``; an Iceberg sink needs the job's ``output`` (table, catalog), and
    ``output.mode: merge`` upserts into the table instead of adding files (``merge_sink``)."""
    if output is not None and output.mode == "merge":
        return MergeSink(output)
    if fmt == "iceberg":
        return IcebergSink(output.table if output else None, output.catalog if output else None)
    return SINKS.get(fmt, ParquetSink)()

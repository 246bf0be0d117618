"""Output sinks: where shards' rows go and how a run becomes visible (see ``base``)."""

from __future__ import annotations

from pipeline.sinks.base import RunCommit, Sink

__all__ = ["RunCommit", "Sink", "sink_for"]


def sink_for(fmt: str) -> Sink:
    if fmt == "delta":
        from pipeline.sinks.delta_sink import DeltaSink

        return DeltaSink()
    if fmt == "lance":
        from pipeline.sinks.lance_sink import LanceSink

        return LanceSink()
    from pipeline.sinks.parquet_sink import ParquetSink

    return ParquetSink()

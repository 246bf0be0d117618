"""Before a run: what the output already holds, and what the job's output mode does with it."""

from __future__ import annotations

from pipeline.errors import OutputError
from pipeline.layout import JOB_FILE, OutputLayout


def prepare_output(layout: OutputLayout, mode: str, wipe: bool, fingerprint: str,
                   fmt: str = "parquet",
                   table_dirs: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """Apply the output mode; returns the ids of shards already committed (resume).

    ``wipe`` (``--fresh``, or ``output.mode: overwrite``): remove what an earlier job wrote,
    with each format's table folders (``table_dirs``), the format written before included.
    """
    if wipe:
        raw = layout.read_json(JOB_FILE) or {}  # read leniently: a wipe must not need it
        earlier = ((raw.get("spec") or {}).get("output") or {}).get("format", "parquet")
        dirs = table_dirs or {}  # the format written before goes too (delta -> lance, say)
        layout.wipe(tuple(dict.fromkeys([*dirs.get(fmt, ()), *dirs.get(earlier, ())])))
        return set()
    previous = layout.read_job()
    if previous is not None and previous.output_format != fmt:
        raise OutputError(f"output.format: {layout.uri} holds {previous.output_format} output, "
                          f"this job writes {fmt}; use another output.uri, or --fresh to "
                          "replace it")
    if mode == "fail_if_exists" and (previous or layout.has_output()):
        raise OutputError(f"output.uri: {layout.uri} already holds output "
                          "(output.mode is fail_if_exists; use --fresh to replace it)")
    if previous is None:
        if layout.has_output():
            raise OutputError(f"output.uri: {layout.uri} holds part files but no "
                              "_pipeline/job.json; refusing to mix outputs (use --fresh)")
        return set()
    if previous.fingerprint != fingerprint:
        raise OutputError(
            f"output.uri: {layout.uri} was written by a job with fingerprint "
            f"{previous.fingerprint[:12]}, this job is {fingerprint[:12]} "
            "(model or task changed); resume refused: use --fresh to start over"
        )
    layout.clear_success()
    return layout.committed_shards()

"""What every input source gives planning: the input's files at one version.

A source lists ``InputFile`` records, the same ones planning cuts into shards for loose
files. A table source lists the data files of one table version from the table's own log or
manifests (never its folder), and gives each file:

- ``version``: what identifies its rows in this table version: the file's own identity plus
  the deletes that apply to it (a Delta deletion vector, Iceberg delete files, a Lance
  deletion file), so a shard id changes when rows of its file are deleted later;
- ``read``: how a worker reads it (a JSON text that is not part of any identity): the table
  version to open, the deletes to apply, partition values a data file does not hold;
- ``columns`` and ``schema``: the table's, so planning checks columns without a footer.

``TableVersion`` is the version read: recorded in job.json, the run manifest and the report,
and read again by a resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.listing import InputFile
from pipeline.redaction import redact_uri


@dataclass(frozen=True)
class TableVersion:
    format: str  # delta | lance | iceberg
    location: str  # the table's root (Delta, Lance) or its metadata file (Iceberg)
    version: int | None  # Delta or Lance version, Iceberg snapshot id (None: no snapshot yet)
    table: str | None = None  # Iceberg: namespace.name in the catalog
    root: str | None = None  # Iceberg: the table's location (data and metadata below it)

    def record(self) -> dict[str, Any]:
        record = {"format": self.format, "location": redact_uri(self.location),
                  "version": self.version}
        return record | ({"table": self.table} if self.table else {})


@dataclass
class Listing:
    files: list[InputFile]
    table: TableVersion | None = None
    pruned: int = 0  # data files the filter excluded from the table's metadata alone
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str | None:
        """Where the input's files live (for the output-is-not-input check)."""
        if self.table is None:
            return None
        return self.table.root or self.table.location


def deletes_id(*parts: Any) -> str:
    """A short stable hash of what deletes rows from one data file."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_info(**info: Any) -> str:
    return json.dumps(info, sort_keys=True)

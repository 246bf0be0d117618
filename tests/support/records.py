"""State records for tests that commit shards by hand: a marker with every required field."""

from __future__ import annotations

import time
from typing import Any

from pipeline.state import ShardMarker


def marker_for(shard_id: str, **fields: Any) -> ShardMarker:
    """A marker of ``shard_id`` as a worker would write it; ``fields`` override the defaults."""
    base: dict[str, Any] = {
        "shard_id": shard_id, "input": f"file:///in/{shard_id}.parquet", "rows_in": 0,
        "rows_out": 0, "attempt": 1, "worker": "cpu@test:1", "pool": "cpu", "provider": "cpu",
        "fingerprint": "fp-test", "part": f"part-{shard_id}.parquet",
        "attempt_token": f"tok-{shard_id}", "committed_at": time.time()}
    return ShardMarker(**{**base, **fields})

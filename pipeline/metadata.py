"""Keys the pipeline writes into Parquet key-value metadata (part files, dead letters) and
into table commits, in one place so every writer and reader agrees on them."""

from __future__ import annotations

META_FINGERPRINT = b"pipeline.fingerprint"
META_MODEL = b"pipeline.model_sha256"
META_BUNDLE = b"pipeline.bundle_identity"
META_SHARD = b"pipeline.shard_id"
# Job-level keys: equal in every part file of an output (a table's schema keeps these).
JOB_KEYS = (META_FINGERPRINT, META_MODEL, META_BUNDLE)

# Properties of a table commit (Delta commit info, Lance transaction properties).
COMMIT_RUN = "pipeline.run"
COMMIT_RUN_ID = "pipeline.run_id"
COMMIT_FINGERPRINT = "pipeline.fingerprint"
COMMIT_SHARDS_ADDED = "pipeline.shards_added"
COMMIT_SHARDS_DROPPED = "pipeline.shards_dropped"
# A run's own token: tells its commit from one of another output (or of the same output
# before --fresh) with the same fingerprint and run id, in a table both merge into.
COMMIT_TOKEN = "pipeline.run_token"


def part_metadata(fingerprint: str, model_sha256: str, bundle_identity: str,
                  shard_id: str) -> dict[bytes, bytes]:
    """What every part file of a shard carries."""
    return {META_FINGERPRINT: fingerprint.encode(), META_MODEL: model_sha256.encode(),
            META_BUNDLE: bundle_identity.encode(), META_SHARD: shard_id.encode()}

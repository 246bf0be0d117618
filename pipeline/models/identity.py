"""A bundle's identity: one sha256 over everything that changes its outputs.

It covers the model's sha256, the canonical form of bundle.yaml and the sha256 of every other
file a task reads (the tokenizer). It is not the hash of where or how a bundle was written:

- bundle.yaml counts by its parsed values, not its bytes: key order, comments, quoting and
  indentation do not change the identity, a changed value does. ``source`` (provenance) and
  ``sha256`` (the model's hash, which enters as the model's verified hash instead) are left out.
- Mappings are compared as sets except ``outputs``, whose order is the tensor task's column
  order; lists (``features``, ``labels``) keep their order.
- A file the spec names but the bundle lacks counts as absent (``null``), so a bundle that
  gains or loses it changes identity; the task that needs it reports it missing.

The job fingerprint and every node cache of bundles (fetched or shipped) key on it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.models.bundle import BundleSpec

# Bump when what goes into the identity changes, so old and new identities never collide.
IDENTITY_FORMAT = 1


def read_files(spec: BundleSpec) -> list[str]:
    """Files besides the model that a task reads, relative to the bundle directory."""
    return [spec.text.tokenizer] if spec.text is not None else []


# Keys added after IDENTITY_FORMAT 1: they count only when set, so that every bundle written
# before them keeps its identity (and every output its fingerprint).
LATER_KEYS = {"feature_count": None, "max_batch": None, "external_data": {}, "image": None,
              "rerank": None, "sparse": None, "detection": None, "generation": None}

LATER_IMAGE_KEYS = {"any_size": False}  # and sizes' longest_edge (None)


def canonical_spec(spec: BundleSpec) -> dict[str, Any]:
    """bundle.yaml as values: defaults filled in, provenance and the model hash left out."""
    data = spec.model_dump(mode="json", exclude={"source", "sha256"})
    for key, default in LATER_KEYS.items():
        if data.get(key) == default:
            data.pop(key, None)
    image = data.get("image") or {}
    for key, default in LATER_IMAGE_KEYS.items():
        if image.get(key) == default:
            image.pop(key, None)
    for size in (image.get("size"), image.get("crop_size")):
        if size and size.get("longest_edge") is None:
            size.pop("longest_edge", None)
    data["outputs"] = [[role, name] for role, name in spec.outputs.items()]
    return data


def bundle_identity(spec: BundleSpec, model_sha256: str, files: dict[str, str | None]) -> str:
    """``files``: sha256 (or None when absent) of each of ``read_files(spec)``."""
    missing = set(read_files(spec)) - set(files)
    if missing:
        raise ValueError(f"bundle identity needs the hash of {', '.join(sorted(missing))}")
    payload = {
        "identity_format": IDENTITY_FORMAT,
        "spec": canonical_spec(spec),
        "model_sha256": model_sha256,
        "files": {name: files[name] for name in read_files(spec)},
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_bytes(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()

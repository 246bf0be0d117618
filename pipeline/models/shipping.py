"""Model bundles only the driver can read, shipped to every node through Ray's object store.

The driver packs the bundle's files once per job and puts them into the object store. Each
node unpacks them once into the bundle cache under a digest of every file (model,
bundle.yaml, tokenizer, ...), so the actors of a node share one copy, and a later job with
the same bundle skips the transfer.
A per-digest file lock makes one process unpack while the others on the node wait.
"""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError
from pipeline.models.bundle import LocalBundle, cache_entry, default_cache_dir, open_local_bundle

COMPLETE = ".complete"


@dataclass(frozen=True)
class ShippedBundle:
    uri: str  # where the driver read it, for messages
    digest: str  # sha256 over every file's name and content
    pinned_sha256: str | None = None
    # [ObjectRef of {relative path: bytes}]: inside a list, so Ray hands the reference to
    # the actor instead of fetching the bytes into every actor that already has a cached copy.
    files: list[Any] = field(default_factory=list, compare=False)


def bundle_files(path: Path) -> dict[str, bytes]:
    """Every regular file below ``path`` except hidden ones (cache bookkeeping, editor files)."""
    files = {}
    for item in sorted(path.rglob("*")):
        relative = item.relative_to(path)
        if item.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = item.read_bytes()
    return files


def content_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class PackedBundle:
    uri: str
    digest: str
    pinned_sha256: str | None
    files: dict[str, bytes] = field(repr=False)


def pack_bundle(bundle: LocalBundle, pinned_sha256: str | None = None) -> PackedBundle:
    """Read the bundle's files into memory. Do it before connecting to Ray: in a job submitted
    with a working directory, that directory may be gone once the driver has connected."""
    files = bundle_files(bundle.path)
    if bundle.spec.model_file not in files:
        raise ModelError(f"model bundle {bundle.uri}: {bundle.spec.model_file} not found in "
                         f"{bundle.path} (found: {', '.join(files) or 'nothing'})")
    return PackedBundle(bundle.uri, content_digest(files), pinned_sha256, files)


def ship_bundle(packed: PackedBundle) -> ShippedBundle:
    """Put the files into the object store (the driver holds the reference for the job)."""
    import ray

    return ShippedBundle(packed.uri, packed.digest, packed.pinned_sha256, [ray.put(packed.files)])


def install_bundle(shipped: ShippedBundle, cache_dir: Path | None = None) -> LocalBundle:
    """The shipped bundle on this node's disk, unpacked once per node and verified."""
    root = (cache_dir or default_cache_dir()) / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"shipped-{shipped.digest}"
    with open(root / f"shipped-{shipped.digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other processes on this node wait here
        if not (final / COMPLETE).exists():
            _unpack(shipped, root, final)
    return open_local_bundle(final, shipped.uri, shipped.pinned_sha256)


def _unpack(shipped: ShippedBundle, root: Path, final: Path) -> None:
    import ray

    files: dict[str, bytes] = ray.get(shipped.files[0])
    if content_digest(files) != shipped.digest:
        raise ModelError(f"model bundle {shipped.uri}: shipped files do not match their digest")
    with cache_entry(root, final, shipped.digest,
                     f"model bundle {shipped.uri}: cannot unpack into {root}") as tmp:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

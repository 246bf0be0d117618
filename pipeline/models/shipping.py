"""Model bundles only the driver can read, shipped to every node through Ray's object store.

The driver packs the bundle's files once per job and puts them into the object store. Each
node unpacks them once into the bundle cache under the bundle's identity (model, canonical
bundle.yaml, tokenizer: ``pipeline.models.identity``), so the actors of a node share one copy,
and a later job with the same bundle skips the transfer. The identity is checked on the packed
bytes, on the shipped bytes and on the unpacked copy; a copy damaged on disk is unpacked again.
A per-identity file lock makes one process unpack while the others on the node wait.
"""

from __future__ import annotations

import fcntl
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ModelError
from pipeline.models.bundle import (
    BUNDLE_FILE,
    LocalBundle,
    cache_entry,
    cached_copy_ok,
    default_cache_dir,
    open_local_bundle,
    parse_bundle_spec,
)
from pipeline.models.identity import bundle_identity, read_files, sha256_bytes

COMPLETE = ".complete"


@dataclass(frozen=True)
class ShippedBundle:
    uri: str  # where the driver read it, for messages
    digest: str  # the bundle's identity (LocalBundle.identity)
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


def files_identity(files: dict[str, bytes], uri: str) -> str:
    """The identity of a bundle held in memory as {relative path: bytes}, its model verified."""
    if BUNDLE_FILE not in files:
        raise ModelError(f"model bundle {uri}: {BUNDLE_FILE} not found")
    spec = parse_bundle_spec(files[BUNDLE_FILE].decode("utf-8", errors="replace"),
                             f"{uri}/{BUNDLE_FILE}")
    if spec.model_file not in files:
        raise ModelError(f"model bundle {uri}: {spec.model_file} not found "
                         f"(found: {', '.join(files) or 'nothing'})")
    actual = hashlib.sha256(files[spec.model_file]).hexdigest()
    if actual != spec.sha256:
        raise ModelError(f"model bundle {uri}: {spec.model_file} has sha256 {actual} but "
                         f"bundle.yaml says {spec.sha256}; the bundle is corrupt or was edited")
    for name, declared in spec.external_data.items():
        if name not in files or hashlib.sha256(files[name]).hexdigest() != declared:
            raise ModelError(f"model bundle {uri}: external data {name} is missing or does not "
                             "match its sha256 in bundle.yaml")
    hashes = {name: sha256_bytes(files.get(name)) for name in read_files(spec)}
    return bundle_identity(spec, actual, hashes)


@dataclass(frozen=True)
class PackedBundle:
    uri: str
    digest: str
    pinned_sha256: str | None
    files: dict[str, bytes] = field(repr=False)


def pack_bundle(bundle: LocalBundle, pinned_sha256: str | None = None) -> PackedBundle:
    """Read the bundle's files into memory. Do it before connecting to Ray: in a job submitted
    with a working directory, that directory may be gone once the driver has connected.
    The files must still be the bundle the job was planned with (``bundle.identity``)."""
    files = bundle_files(bundle.path)
    identity = files_identity(files, bundle.uri)
    if identity != bundle.identity:
        raise ModelError(f"model bundle {bundle.uri}: changed on disk while the job was being "
                         f"planned (identity {bundle.identity[:12]}… is now {identity[:12]}…); "
                         "run the job again")
    return PackedBundle(bundle.uri, identity, pinned_sha256, files)


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
        if not cached_copy_ok(final, shipped.digest):
            _unpack(shipped, root, final)
    bundle = open_local_bundle(final, shipped.uri, shipped.pinned_sha256)
    if bundle.identity != shipped.digest:  # written and checked above: only a racing writer
        raise ModelError(f"model bundle {shipped.uri}: the copy in {final} does not match "
                         "the shipped bundle; remove it and run the job again")
    return bundle


def _unpack(shipped: ShippedBundle, root: Path, final: Path) -> None:
    import ray

    files: dict[str, bytes] = ray.get(shipped.files[0])
    if files_identity(files, shipped.uri) != shipped.digest:
        raise ModelError(f"model bundle {shipped.uri}: shipped files do not match their identity")
    with cache_entry(root, final, shipped.digest,
                     f"model bundle {shipped.uri}: cannot unpack into {root}") as tmp:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

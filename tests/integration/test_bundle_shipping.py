"""A bundle only the driver can read, shipped through Ray's object store, unpacked per node."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from pipeline.errors import ModelError
from pipeline.models.bundle import fetch_bundle
from pipeline.models.shipping import (
    ShippedBundle,
    bundle_files,
    content_digest,
    install_bundle,
    pack_bundle,
    ship_bundle,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")


@ray.remote(num_cpus=0)
def install_remotely(shipped: ShippedBundle, cache: str) -> tuple[str, str, float]:
    bundle = install_bundle(shipped, Path(cache))
    return str(bundle.path), bundle.sha256, (bundle.path / ".complete").stat().st_mtime


def test_shipped_bundle_is_unpacked_once_per_node_and_identical(breast_cancer_dir, tmp_path):
    local = fetch_bundle(str(breast_cancer_dir))
    shipped = ship_bundle(pack_bundle(local))
    cache = tmp_path / "cache"
    path, sha, first_mtime = ray.get(install_remotely.remote(shipped, str(cache)))
    assert sha == local.sha256
    assert path.endswith(f"shipped-{shipped.digest}")
    assert bundle_files(Path(path)) == bundle_files(breast_cancer_dir)
    # A second actor on the node reuses the copy: nothing is unpacked again.
    _, _, again = ray.get(install_remotely.remote(shipped, str(cache)))
    assert again == first_mtime


def test_digest_covers_every_file_not_only_the_model(breast_cancer_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(breast_cancer_dir, copy)
    before = content_digest(bundle_files(copy))
    with open(copy / "bundle.yaml", "a") as fh:
        fh.write("# edited\n")
    edited = content_digest(bundle_files(copy))
    assert edited != before
    (copy / ".complete").write_text("bookkeeping is not content")
    assert content_digest(bundle_files(copy)) == edited


def test_a_pinned_hash_is_checked_on_the_worker(breast_cancer_dir, tmp_path):
    shipped = ship_bundle(pack_bundle(fetch_bundle(str(breast_cancer_dir)), pinned_sha256="0" * 64))
    with pytest.raises(ModelError, match=r"model\.sha256: pinned 0000"):
        install_bundle(shipped, tmp_path / "cache")

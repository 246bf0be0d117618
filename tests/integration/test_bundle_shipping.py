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
    files_identity,
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
    assert shipped.digest == local.identity  # keyed like the job fingerprint and fetched copies
    assert path.endswith(f"shipped-{local.identity}")
    assert (Path(path) / ".complete").read_text() == local.identity
    assert bundle_files(Path(path)) == bundle_files(breast_cancer_dir)
    # A second actor on the node reuses the copy: nothing is unpacked again.
    _, _, again = ray.get(install_remotely.remote(shipped, str(cache)))
    assert again == first_mtime


def test_digest_is_the_identity_not_the_file_bytes(breast_cancer_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(breast_cancer_dir, copy)
    before = files_identity(bundle_files(copy), str(copy))
    assert before == fetch_bundle(str(copy)).identity
    with open(copy / "bundle.yaml", "a") as fh:
        fh.write("# edited\n")  # formatting: the same bundle
    assert files_identity(bundle_files(copy), str(copy)) == before
    text = (copy / "bundle.yaml").read_text()
    (copy / "bundle.yaml").write_text(text.replace("- benign", "- healthy"))
    edited = files_identity(bundle_files(copy), str(copy))
    assert edited != before
    (copy / ".complete").write_text("bookkeeping is not content")
    assert files_identity(bundle_files(copy), str(copy)) == edited


def test_bundle_edited_after_planning_is_not_shipped(breast_cancer_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(breast_cancer_dir, copy)
    planned = fetch_bundle(str(copy))
    assert planned.identity  # the job fingerprint took it
    text = (copy / "bundle.yaml").read_text()
    (copy / "bundle.yaml").write_text(text.replace("- benign", "- healthy"))
    with pytest.raises(ModelError, match="changed on disk while the job was being planned"):
        pack_bundle(planned)


def test_damaged_copy_on_a_node_is_unpacked_again(breast_cancer_dir, tmp_path):
    local = fetch_bundle(str(breast_cancer_dir))
    shipped = ship_bundle(pack_bundle(local))
    first = install_bundle(shipped, tmp_path / "cache")
    text = (first.path / "bundle.yaml").read_text()
    (first.path / "bundle.yaml").write_text(text.replace("- benign", "- damaged"))
    again = install_bundle(shipped, tmp_path / "cache")
    assert again.path == first.path
    assert again.spec.labels == ["malignant", "benign"]
    assert again.identity == shipped.digest


def test_a_pinned_hash_is_checked_on_the_worker(breast_cancer_dir, tmp_path):
    shipped = ship_bundle(pack_bundle(fetch_bundle(str(breast_cancer_dir)), pinned_sha256="0" * 64))
    with pytest.raises(ModelError, match=r"model\.sha256: pinned 0000"):
        install_bundle(shipped, tmp_path / "cache")


def test_shipped_files_not_matching_their_identity_are_refused(breast_cancer_dir, tmp_path):
    packed = pack_bundle(fetch_bundle(str(breast_cancer_dir)))
    files = dict(packed.files)
    files["bundle.yaml"] = files["bundle.yaml"].replace(b"- benign", b"- swapped")
    shipped = ShippedBundle(packed.uri, packed.digest, None, [ray.put(files)])
    with pytest.raises(ModelError, match="do not match their identity"):
        install_bundle(shipped, tmp_path / "cache")
    assert not (tmp_path / "cache" / "bundles" / f"shipped-{packed.digest}").exists()

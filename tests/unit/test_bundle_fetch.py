"""fetch_bundle: local bundles in place, remote ones cached once per node by identity."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest
import yaml

from pipeline.errors import ModelError
from pipeline.models import bundle as bundle_mod
from pipeline.models.bundle import fetch_bundle
from pipeline.storage import sha256_file


@pytest.fixture
def memory_bundle(breast_cancer_dir: Path):
    """The breast-cancer bundle served from fsspec's in-memory filesystem."""
    fs = fsspec.filesystem("memory")
    root = f"/bundles-{uuid.uuid4().hex}/breast_cancer"
    for item in breast_cancer_dir.iterdir():
        fs.pipe(f"{root}/{item.name}", item.read_bytes())
    yield fs, root, f"memory://{root}"
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def _yaml_sha(bundle: Path) -> str:
    return yaml.safe_load((bundle / "bundle.yaml").read_text())["sha256"]


# ---- local -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_bundle_is_used_in_place(breast_cancer_dir, tmp_path, scheme):
    uri = f"{scheme}{breast_cancer_dir}"
    bundle = fetch_bundle(uri, cache_dir=tmp_path / "cache")
    assert bundle.path == breast_cancer_dir.resolve()
    assert bundle.uri == uri
    assert bundle.spec.task == "classify"
    assert bundle.sha256 == _yaml_sha(breast_cancer_dir) == sha256_file(str(bundle.model_path))
    assert bundle.model_path == breast_cancer_dir.resolve() / "model.onnx"
    assert bundle.tokenizer_path is None
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_local_bundle_with_pinned_sha(breast_cancer_dir):
    sha = _yaml_sha(breast_cancer_dir)
    assert fetch_bundle(str(breast_cancer_dir), pinned_sha256=sha).sha256 == sha


def test_local_pinned_sha_mismatch(breast_cancer_dir):
    with pytest.raises(ModelError, match=r"^model\.sha256: pinned f{64} ") as err:
        fetch_bundle(str(breast_cancer_dir), pinned_sha256="f" * 64)
    assert _yaml_sha(breast_cancer_dir) in str(err.value)


def test_local_tokenizer_path(minilm_dir):
    bundle = fetch_bundle(str(minilm_dir))
    assert bundle.tokenizer_path == minilm_dir.resolve() / "tokenizer.json"


def test_local_modified_model_is_rejected(breast_cancer_dir, tmp_path):
    copy = tmp_path / "bc"
    shutil.copytree(breast_cancer_dir, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256"):
        fetch_bundle(str(copy))


def test_local_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="not a directory"):
        fetch_bundle(str(tmp_path / "missing"))


def test_local_directory_without_bundle_yaml(tmp_path):
    with pytest.raises(ModelError, match=r"bundle\.yaml not found"):
        fetch_bundle(str(tmp_path))


# ---- remote (memory://) --------------------------------------------------------------------


def test_remote_bundle_is_downloaded_into_cache(memory_bundle, breast_cancer_dir, tmp_path):
    _, _, uri = memory_bundle
    sha = _yaml_sha(breast_cancer_dir)
    identity = fetch_bundle(str(breast_cancer_dir)).identity
    bundle = fetch_bundle(uri, cache_dir=tmp_path)
    assert bundle.path == tmp_path / "bundles" / identity
    assert bundle.uri == uri
    assert bundle.sha256 == sha
    assert bundle.identity == identity
    assert (bundle.path / ".complete").read_text() == identity
    original = (breast_cancer_dir / "model.onnx").read_bytes()
    assert (bundle.path / "model.onnx").read_bytes() == original
    assert not list((tmp_path / "bundles").glob(".tmp-*"))


def test_remote_bundle_is_reused_from_cache(memory_bundle, tmp_path):
    fs, root, uri = memory_bundle
    first = fetch_bundle(uri, cache_dir=tmp_path)
    mtime = first.model_path.stat().st_mtime_ns

    # Without the model in the store a fresh download fails ...
    fs.rm(f"{root}/model.onnx")
    with pytest.raises(ModelError, match="download failed"):
        fetch_bundle(uri, cache_dir=tmp_path / "other-cache")
    # ... but the cached copy is used as it is.
    second = fetch_bundle(uri, cache_dir=tmp_path)
    assert second.path == first.path
    assert second.model_path.stat().st_mtime_ns == mtime


def test_remote_pinned_sha_mismatch_downloads_nothing(memory_bundle, tmp_path):
    _, _, uri = memory_bundle
    with pytest.raises(ModelError, match=r"^model\.sha256: pinned 0{64} "):
        fetch_bundle(uri, pinned_sha256="0" * 64, cache_dir=tmp_path)
    assert not (tmp_path / "bundles").exists()


def test_remote_corrupt_model_is_not_cached(memory_bundle, tmp_path):
    fs, root, uri = memory_bundle
    fs.pipe(f"{root}/model.onnx", b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        fetch_bundle(uri, cache_dir=tmp_path)
    bundles = tmp_path / "bundles"
    assert not [p for p in bundles.iterdir() if p.is_dir()]  # no cache entry, no temp dir


def test_concurrent_fetches_download_once(memory_bundle, tmp_path, monkeypatch):
    _, _, uri = memory_bundle
    real_download = bundle_mod._download
    downloads: list[str] = []
    guard = threading.Lock()

    def slow_download(*args, **kwargs):
        with guard:
            downloads.append(threading.current_thread().name)
        time.sleep(0.3)  # a window in which the other fetchers would start their own download
        return real_download(*args, **kwargs)

    monkeypatch.setattr(bundle_mod, "_download", slow_download)
    start = threading.Barrier(4)

    def fetch(_: int):
        start.wait()
        return fetch_bundle(uri, cache_dir=tmp_path)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(fetch, range(4)))

    assert len(downloads) == 1
    paths = {r.path for r in results}
    assert len(paths) == 1
    path = paths.pop()
    assert (path / ".complete").exists()
    assert sha256_file(str(path / "model.onnx")) == results[0].sha256
    assert not list((tmp_path / "bundles").glob(".tmp-*"))


def test_remote_bundle_yaml_value_change_is_a_new_cache_entry(memory_bundle, tmp_path):
    fs, root, uri = memory_bundle
    first = fetch_bundle(uri, cache_dir=tmp_path)
    data = yaml.safe_load(fs.cat_file(f"{root}/bundle.yaml"))
    data["labels"] = ["bad", "good"]
    fs.pipe(f"{root}/bundle.yaml", yaml.safe_dump(data).encode())
    second = fetch_bundle(uri, cache_dir=tmp_path)
    assert second.identity != first.identity
    assert second.path != first.path
    assert second.spec.labels == ["bad", "good"]
    assert first.spec.labels == ["malignant", "benign"]  # the old entry is left as it was


def test_remote_provenance_edit_reuses_the_cache_entry(memory_bundle, tmp_path):
    fs, root, uri = memory_bundle
    first = fetch_bundle(uri, cache_dir=tmp_path)
    data = yaml.safe_load(fs.cat_file(f"{root}/bundle.yaml"))
    data["source"] = {"note": "re-uploaded"}
    fs.pipe(f"{root}/bundle.yaml", ("# comment\n" + yaml.safe_dump(data, indent=4)).encode())
    second = fetch_bundle(uri, cache_dir=tmp_path)
    assert second.path == first.path
    assert second.identity == first.identity


def test_cached_copy_with_edited_values_is_fetched_again(memory_bundle, tmp_path):
    _, _, uri = memory_bundle
    first = fetch_bundle(uri, cache_dir=tmp_path)
    text = (first.path / "bundle.yaml").read_text()
    (first.path / "bundle.yaml").write_text(text.replace("- benign", "- tampered"))
    second = fetch_bundle(uri, cache_dir=tmp_path)
    assert second.path == first.path
    assert second.spec.labels == ["malignant", "benign"]

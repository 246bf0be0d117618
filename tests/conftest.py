"""Shared fixtures: locations of the built bundles (``make models``) and test data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def models_dir(repo_root: Path) -> Path:
    path = repo_root / "models"
    assert path.is_dir(), f"{path} is missing: run `make models` before the tests"
    return path


@pytest.fixture(scope="session")
def minilm_dir(models_dir: Path) -> Path:
    path = models_dir / "minilm"
    assert (path / "bundle.yaml").exists(), f"{path} is not built: run `make models`"
    return path


@pytest.fixture(scope="session")
def breast_cancer_dir(models_dir: Path) -> Path:
    path = models_dir / "breast_cancer"
    assert (path / "bundle.yaml").exists(), f"{path} is not built: run `make models`"
    return path


@pytest.fixture(scope="session")
def minilm_reference(repo_root: Path) -> tuple[list[str], np.ndarray]:
    """200 texts and their sentence-transformers embeddings (normalized)."""
    data = np.load(repo_root / "tests" / "fixtures" / "minilm_reference.npz", allow_pickle=False)
    texts = [str(t) for t in data["texts"]]
    embeddings = np.asarray(data["embeddings"], dtype=np.float32)
    assert len(texts) == len(embeddings) == 200
    return texts, embeddings


# Real Ray cluster and S3 endpoint fixtures, shared by the whole session.
pytest_plugins = ["tests.support.fixtures"]

"""Our pixels are the framework's: each image case's pixels, made from the raw bytes by the
bundle ``import`` inferred from ``preprocessor_config.json``, match what transformers' own
image processor made (``pixel_values.npy``) to 1e-4, and the tolerance is tight enough that a
wrong resize filter, channel order, crop or normalization fails it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.models.bundle import ImageSize, ImageSpec
from pipeline.models.importing import import_model
from pipeline.tasks.images import preprocess

CASES_DIR = Path(__file__).parent / "cases"
IMAGE_CASES = sorted(p for p in CASES_DIR.iterdir() if (p / "pixel_values.npy").exists())
TOLERANCE = 1e-4


def pixels_of(case: Path, spec: ImageSpec) -> np.ndarray:
    images = pq.read_table(case / "sample.parquet")["image"].to_pylist()
    return np.stack([preprocess(data, spec) for data in images])


@pytest.fixture(scope="module", params=IMAGE_CASES, ids=lambda c: c.name)
def imported(request, tmp_path_factory) -> tuple[Path, ImageSpec]:
    case = request.param
    bundle = import_model(str(case / "src"), tmp_path_factory.mktemp(case.name) / "b").bundle
    return case, bundle.spec.image


def test_image_cases_exist():
    assert {c.name for c in IMAGE_CASES} >= {"optimum_image_classifier",
                                             "torch_clip_image_embedder"}


def test_pixels_match_the_frameworks_image_processor(imported):
    case, spec = imported
    want = np.load(case / "pixel_values.npy")
    got = pixels_of(case, spec)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOLERANCE


@pytest.mark.parametrize("change", ["resample", "channels", "normalize", "crop", "rescale"])
def test_a_wrong_step_fails_the_tolerance(imported, change):
    case, spec = imported
    want = np.load(case / "pixel_values.npy")
    if change == "channels":  # BGR instead of RGB
        got = pixels_of(case, spec)[:, ::-1]
    else:
        update = {
            "resample": {"resample": "bilinear" if spec.resample != "bilinear" else "bicubic"},
            "normalize": {"image_std": [1.0, 1.0, 1.0]},
            "crop": {"size": ImageSize(shortest_edge=spec.size.shortest_edge + 4)}
            if spec.size.shortest_edge else {"size": ImageSize(height=spec.size.height + 4,
                                                               width=spec.size.width + 4)},
            "rescale": {"rescale_factor": 1 / 256},
        }[change]
        got = pixels_of(case, spec.model_copy(update=update))
    assert np.abs(got - want).max() > 100 * TOLERANCE

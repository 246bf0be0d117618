"""Images and text pairs through every entry point: jobs over a folder of image files (and
image paths on the S3 endpoint), incremental runs, the Lance and Delta sinks, ``score`` and
``OnnxPredictor``; real Ray, real onnxruntime, the demo classifier (models/image) and the
conformance cases' converter outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline import OnnxPredictor
from tests.support.images import MIXED, DirectClassifier, encode, write_mixed_images

pytestmark = pytest.mark.usefixtures("ray_cluster")
CASES = Path(__file__).resolve().parents[1] / "conformance" / "cases"


@pytest.fixture(scope="module")
def image_model(models_dir: Path) -> Path:
    path = models_dir / "image"
    assert (path / "bundle.yaml").exists(), f"{path} is not built: run `make models`"
    return path


def image_job(folder: Path, model: Path, out: Path, **output) -> dict:
    """No task block: the bundle says it classifies images from the column ``image``."""
    return {"name": "images", "input": {"uri": str(folder), "format": "images"},
            "model": {"uri": str(model)}, "passthrough": ["path"],
            "sharding": {"rows_per_shard": 3}, "workers": {"cpu": {"replicas": 2, "cpus": 1}},
            "bad_rows": {"max_fraction": 0.2}, "output": {"uri": str(out), **output}}


def by_path(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a row was written twice"
    return {p.rsplit("/images/", 1)[-1]: r for p, r in zip(paths, rows, strict=True)}


def dead_letters(out: Path) -> list[dict]:
    files = sorted((out / "_pipeline" / "dead_letter").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def assert_scored(rows: dict[str, dict], images: dict[str, bytes], direct: DirectClassifier,
                  labels: list[str]) -> None:
    assert set(rows) == set(images)
    for name, data in images.items():
        want = direct.probabilities(data)
        got = np.asarray(rows[name]["probabilities"])
        assert np.abs(got - want).max() < 1e-5, name
        assert rows[name]["label"] == labels[int(want.argmax())]
        assert rows[name]["score"] == pytest.approx(float(want.max()), abs=1e-5)


def test_a_folder_of_mixed_images_is_scored_once_and_the_corrupt_file_dead_lettered(
        image_model: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "out"
    images = write_mixed_images(folder)
    direct = DirectClassifier(image_model)
    labels = direct.bundle.spec.labels
    spec = image_job(folder, image_model, out, mode="incremental")

    first = pipeline.run_job(spec, progress=False)
    assert first.ok and first.exit_code == 0, first.report["failures"]
    assert first.report["totals"]["shards"] >= 3  # 10 files in shards of 3: several workers
    assert_scored(by_path(first.read()), images, direct, labels)
    bad = dead_letters(out)
    assert [(r["path"].rsplit("/", 1)[-1], r["_input"].rsplit("/", 1)[-1]) for r in bad] == \
        [("broken.png", "broken.png")]
    assert "image" in bad[0]["_reason"] and "\n" not in bad[0]["_reason"]
    assert first.report["totals"]["rows_bad"] == 1

    # Incremental: a new image and a changed one are all that is computed.
    images["new.png"] = encode((0, 0, 200, 150), "RGB", "PNG", photo=1)
    (folder / "new.png").write_bytes(images["new.png"])
    images["big.jpg"] = encode((0, 0, 500, 427), "RGB", "JPEG", photo=1)
    (folder / "big.jpg").write_bytes(images["big.jpg"])
    second = pipeline.run_job(spec, progress=False)
    assert second.ok, second.report["failures"]
    files = second.report["run"]["input_files"]
    assert (files["new"]["count"], files["changed"]["count"]) == (1, 1), files
    # Only the shards of the two files ran again; the rest were kept as they were.
    assert second.report["totals"]["run_now"] <= 2 < first.report["totals"]["run_now"]
    assert_scored(by_path(second.read()), images, direct, labels)


def test_image_paths_on_object_storage(image_model: Path, tmp_path: Path, s3_bucket: str,
                                       s3_options: dict) -> None:
    """A Parquet column of s3:// URIs: workers read each image with the input's options; a
    missing object is a dead letter naming it."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    images = {}
    for i, (name, box, mode, fmt) in enumerate(MIXED[:4]):
        images[name] = encode(box, mode, fmt, photo=i % 2)
        fs.pipe(f"{s3_bucket}/pics/{name}", images[name])
    uris = [f"s3://{s3_bucket}/pics/{n}" for n in images] + [f"s3://{s3_bucket}/pics/gone.jpg"]
    pq.write_table(pa.table({"id": list(range(len(uris))), "image": uris}),
                   tmp_path / "paths.parquet")
    out = tmp_path / "out"
    spec = {"name": "image-uris", "model": {"uri": str(image_model)}, "passthrough": ["id"],
            "input": {"uri": str(tmp_path / "paths.parquet"), "storage_options": s3_options},
            "workers": {"cpu": {"replicas": 1}}, "bad_rows": {"max_fraction": 0.5},
            "output": {"uri": str(out)}}
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    rows = {r["id"]: r for r in result.read().to_pylist()}
    direct = DirectClassifier(image_model)
    for i, data in enumerate(images.values()):
        assert np.abs(np.asarray(rows[i]["probabilities"]) -
                      direct.probabilities(data)).max() < 1e-5
    [gone] = dead_letters(out)
    assert gone["id"] == 4 and f"s3://{s3_bucket}/pics/gone.jpg" in gone["_reason"]


def test_image_embeddings_go_into_lance_with_a_vector_index(tmp_path: Path) -> None:
    """The CLIP vision tower (torch.onnx) named directly in model.uri: imported, its vectors
    written to Lance and indexed; a stored vector's nearest neighbour is its own row."""
    import lance

    folder, out = tmp_path / "images", tmp_path / "vectors"
    write_mixed_images(folder)
    spec = {"name": "image-embed", "input": {"uri": str(folder), "format": "images"},
            "model": {"uri": str(CASES / "torch_clip_image_embedder" / "src")},
            "passthrough": ["path"], "workers": {"cpu": {"replicas": 1}},
            "bad_rows": {"max_fraction": 0.2},
            "output": {"uri": str(out), "format": "lance", "mode": "incremental",
                       "index": {"metric": "cosine", "type": "IVF_FLAT", "num_partitions": 2}}}
    result = pipeline.run_job(spec, progress=False)
    assert result.ok, result.report["failures"]
    assert result.report["run"]["table"]["index"]["built"] is True
    ds = lance.dataset(str(out))
    assert ds.count_rows() == len(MIXED) and len(ds.describe_indices()) == 1
    table = ds.to_table(columns=["path", "embedding"])
    assert table.schema.field("embedding").type.list_size == 16
    row = table["path"].to_pylist().index(table["path"][3].as_py())
    query = np.asarray(table["embedding"][row].values, dtype=np.float32)
    hits = ds.to_table(nearest={"column": "embedding", "q": query, "k": 1, "metric": "cosine"},
                       columns=["path"])
    assert hits["path"].to_pylist() == [table["path"][3].as_py()]


def test_rerank_runs_incrementally_into_delta(tmp_path: Path) -> None:
    """Pairs in two files, then a third: the Delta table holds every pair once, with the
    cross-encoder's scores as score() gives them."""
    from deltalake import DeltaTable

    case = CASES / "sentence_transformers_cross_encoder"
    sample = pq.read_table(case / "sample.parquet")
    folder, out = tmp_path / "pairs", tmp_path / "scores"
    folder.mkdir()
    pq.write_table(sample.slice(0, 5), folder / "a.parquet")
    pq.write_table(sample.slice(5, 5), folder / "b.parquet")
    spec = {"name": "rerank", "input": {"uri": str(folder)}, "model": {"uri": str(case / "src")},
            "passthrough": ["id"], "workers": {"cpu": {"replicas": 1}},
            "output": {"uri": str(out), "format": "delta", "mode": "incremental"}}
    assert pipeline.run_job(spec, progress=False).ok
    pq.write_table(sample.slice(10), folder / "c.parquet")
    second = pipeline.run_job(spec, progress=False)
    assert second.ok and second.report["run"]["input_files"]["new"]["count"] == 1
    table = DeltaTable(str(out)).to_pyarrow_table().sort_by("id")
    assert table["id"].to_pylist() == sample["id"].to_pylist()
    want = pipeline.score(sample, model=str(case / "src"), passthrough=["id"])
    assert np.allclose(table["score"].to_numpy(), want["score"].to_numpy(), atol=1e-6)


def test_score_and_predictor_take_image_structs_bytes_and_pairs() -> None:
    """Image bytes in the layout of Hugging Face datasets' Parquet ({bytes, path}), a bad
    image kept with its reason, and text pairs, as the frameworks computed them."""
    case = CASES / "torch_clip_image_embedder"
    sample = pq.read_table(case / "sample.parquet")
    with np.load(case / "reference.npz") as ref:
        want = ref["embedding"]
    structs = pa.StructArray.from_arrays(
        [sample["image"].combine_chunks(), pa.array(sample["name"].to_pylist())],
        names=["bytes", "path"])
    table = pa.table({"id": sample["id"], "image": structs})
    scored = pipeline.score(table, model=str(case / "src"), passthrough=["id"])
    got = np.asarray(scored["embedding"].to_pylist(), dtype=np.float32)
    assert np.abs(got - want).max() < 1e-4

    broken = pa.table({"id": [0, 1], "image": pa.array([sample["image"][0].as_py(), b"\x89PNG"],
                                                       pa.binary())})
    kept = OnnxPredictor(str(case / "src"), passthrough=["id"], on_bad_row="keep")(broken)
    assert kept["_error"].to_pylist()[0] is None
    assert kept["embedding"][1].as_py() is None and "image" in kept["_error"][1].as_py()

    pairs = CASES / "sentence_transformers_cross_encoder"
    sample = pq.read_table(pairs / "sample.parquet")
    with np.load(pairs / "reference.npz") as ref:
        scores = ref["score"]
    scored = pipeline.score(sample.to_pandas(), model=str(pairs / "src"))
    assert np.abs(scored["score"].to_numpy() - scores).max() < 1e-4
    meta = json.loads((pairs / "case.json").read_text())
    assert meta["task"] == "rerank"

"""Models as real converters wrote them run as their framework computes, with nothing written
by hand: ``import`` with no flags gives the right bundle, a real ``python -m pipeline.run`` job
with no task block (the converter's output straight in ``model.uri``) and ``OnnxPredictor``
give the framework's outputs row for row.

The cases (``cases/<name>``: ``src/`` as the converter wrote it, ``sample.parquet``,
``reference.npz`` or ``reference.parquet`` computed by the source framework, ``case.json``)
are made by scripts/make_conformance_models.py in a side environment; this suite needs no
framework. A case's ``variants`` are task settings (an aggregation strategy, windows) with the
reference column the framework gave for each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import OnnxPredictor
from pipeline.errors import ModelError
from pipeline.import_checks import _compare, read_sample, reference_check
from pipeline.models.importing import ImportOptions, import_model

CASES_DIR = Path(__file__).parent / "cases"
CASES = sorted(p for p in CASES_DIR.iterdir() if (p / "case.json").exists())
RUNNABLE = [c for c in CASES if "refused" not in json.loads((c / "case.json").read_text())]
# Cases whose job names a task the bundle does not (zero-shot on an NLI classifier: labels).
AS_IMPORTED = [c for c in RUNNABLE if "job_task" not in json.loads((c / "case.json").read_text())]
REPO = Path(__file__).resolve().parents[2]


def meta(case: Path) -> dict:
    return json.loads((case / "case.json").read_text())


def reference(case: Path, variants: bool = False) -> dict[str, Any]:
    """The framework's outputs by column: the default task's, or (``variants``) every column."""
    if (case / "reference.parquet").exists():
        columns = pq.read_table(case / "reference.parquet").to_pydict()
        if not variants:
            columns = {k: v for k, v in columns.items() if k not in meta(case).get("variants", {})}
        return columns
    with np.load(case / "reference.npz", allow_pickle=False) as data:
        return {name: data[name] for name in data.files
                if variants or name not in meta(case).get("variants", {})}


def reference_file(case: Path, folder: Path, spoil: bool = False) -> Path:
    """The default task's reference as a file ``import --reference`` reads; ``spoil``: with one
    row changed enough to fail any tolerance."""
    columns = {name: _spoiled(values) if spoil else values
               for name, values in reference(case).items()}
    if (case / "reference.parquet").exists():
        path = folder / ("wrong.parquet" if spoil else "right.parquet")
        schema = pq.read_schema(case / "reference.parquet")
        pq.write_table(pa.table({k: pa.array(v, schema.field(k).type)
                                 for k, v in columns.items()}), path)
    else:
        path = folder / ("wrong.npz" if spoil else "right.npz")
        np.savez(path, **columns)
    return path


def assert_matches(case: Path, columns: dict[str, list]) -> None:
    m = meta(case)
    for name, want in reference(case).items():
        assert name in columns, f"{case.name}: no output column {name} in {sorted(columns)}"
        if isinstance(want, list) and want and isinstance(want[0], list):  # records
            assert sum(len(w or ()) for w in want) > 0, f"{case.name}: an empty reference"
        problem = _compare(name, columns[name], list(want), m.get("atol", 1e-4),
                           m.get("min_cosine", 0.9999))
        assert problem is None, f"{case.name}: {problem}"


def test_every_converter_and_trap_has_a_case():
    converters = {meta(c)["converter"].split(" (")[0] for c in CASES}
    assert {"torch.onnx", "sentence-transformers ONNX backend", "Optimum", "skl2onnx",
            "onnxmltools"} <= converters
    traps = " ".join(meta(c)["trap"] for c in CASES)
    for trap in ("fixed at 1", "Reshape", "external data", "ZipMap", "IR 14",
                 "operator the runtime lacks", "bool outputs"):
        assert trap in traps


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_import_with_no_flags(case, tmp_path):
    m = meta(case)
    out = tmp_path / "bundle"
    if "refused" in m:
        with pytest.raises(ModelError) as refused:
            import_model(str(case / "src"), out)
        assert m["refused"] in str(refused.value) and "\n" not in str(refused.value)
        for part in m.get("refused_also", []):
            assert part in str(refused.value), (part, str(refused.value))
        assert not out.exists()  # nothing written
        return
    done = import_model(str(case / "src"), out)
    spec = done.bundle.spec
    assert spec.task == m["task"]
    for repair in m.get("repairs", []):
        assert any(repair in r for r in done.repairs), (repair, done.repairs)
    for warning in m.get("warnings", []):
        assert any(warning in w for w in done.warnings), (warning, done.warnings)
    assert (spec.max_batch == 1) == bool(m.get("warnings"))
    assert bool(spec.external_data) == bool(m.get("external_data"))
    for name in spec.external_data:
        assert (out / name).is_file()
    recorded = spec.source["inferred"]
    assert all(f["from"] for f in recorded) and {f["key"] for f in recorded} >= {"task"}


@pytest.mark.parametrize("case", AS_IMPORTED, ids=lambda c: c.name)
def test_import_checks_the_reference_and_refuses_a_mismatch(case, tmp_path):
    sample = read_sample(case / "sample.parquet")
    right = reference_file(case, tmp_path)
    ok = ImportOptions(verify=reference_check(sample, right, 1e-4, 0.999))
    import_model(str(case / "src"), tmp_path / "ok", ok)
    if case.name not in SPOILED:
        return
    wrong = reference_file(case, tmp_path, spoil=True)
    bad = ImportOptions(verify=reference_check(sample, wrong, 1e-4, 0.999))
    with pytest.raises(ModelError, match=r"--reference .*wrong\.\w+: row \d+: ") as refused:
        import_model(str(case / "src"), tmp_path / "bad", bad)
    assert "\n" not in str(refused.value) and not (tmp_path / "bad").exists()


# A reference of each kind is spoiled to show the check refuses it (the comparison is the same
# code for every case of a kind): tensors, labels and probabilities, records, sparse vectors.
SPOILED = {"dynamo_multi_output", "skl2onnx_zipmap", "sentence_transformers_onnx",
           "optimum_ner_wordpiece", "sentence_transformers_splade", "ultralytics_yolo_nms"}


def _spoiled(values: Any) -> Any:
    """The reference with one row changed enough to fail any tolerance (records: the first
    row with any loses its last one; sparse vectors: the first one's first weight grows)."""
    if isinstance(values, list) and values and isinstance(values[0], dict):
        first = values[0]
        return [{**first, "values": [first["values"][0] + 1.0, *first["values"][1:]]},
                *values[1:]]
    if isinstance(values, list):
        row = next(i for i, v in enumerate(values) if v)
        return [v[:-1] if i == row else v for i, v in enumerate(values)]
    spoiled = values.copy()
    if spoiled.dtype.kind in "fc":
        spoiled[0] = -spoiled[0] - 1.0
    elif spoiled.dtype.kind in "iu":
        spoiled[0] = spoiled[0] + 7
    elif spoiled.dtype.kind == "b":
        spoiled[0] = not spoiled[0]
    else:
        spoiled[0] = "not-" + str(spoiled[0])
    return spoiled


@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.name)
def test_onnx_predictor_gives_the_frameworks_outputs(case):
    table = pq.read_table(case / "sample.parquet")
    predictor = OnnxPredictor(str(case / "src"), meta(case).get("job_task"), passthrough=["id"],
                              on_bad_row="keep")
    out = predictor(table)
    bad = meta(case).get("bad_rows", {})
    assert {str(i): e for i, e in enumerate(out["_error"].to_pylist()) if e} == bad
    assert_matches(case, out.to_pydict())


VARIANTS = [(c, column) for c in RUNNABLE for column in meta(c).get("variants", {})]


@pytest.mark.parametrize(("case", "column"), VARIANTS, ids=lambda v: getattr(v, "name", v))
def test_every_task_setting_gives_the_frameworks_outputs(case, column):
    """Each aggregation strategy (and windows over long texts) as the framework computes it."""
    settings = meta(case)["variants"][column]
    task = {**(meta(case).get("job_task") or {"kind": meta(case)["task"]}), **settings}
    table = pq.read_table(case / "sample.parquet")
    predictor = OnnxPredictor(str(case / "src"), passthrough=["id"], on_bad_row="keep",
                              task=task)
    out = predictor(table)
    want = reference(case, variants=True)[column]
    assert (np.size(want) if isinstance(want, np.ndarray) else sum(len(w or ()) for w in want))
    # The reference column is the output column it holds, suffixed: entities_first, ...
    written = [c for c in out.column_names if column.startswith(c + "_")]
    assert len(written) == 1, (column, out.column_names)
    problem = _compare(column, out[written[0]].to_pylist(), want,
                       meta(case)["atol"], 0.9999)
    assert problem is None, f"{case.name} {settings}: {problem}"


# One case runs as its own ``python -m pipeline.run`` driver, the rest through run_job in this
# process (the same planner, runner and workers, without 3 s of interpreter start each).
CLI_CASE = "skl2onnx_zipmap"
# Cases whose job runs in tests/integration/test_task_families.py (incremental runs into a
# table, a folder of images): not run a second time here.
JOB_ELSEWHERE = {"optimum_ner_bpe", "optimum_zero_shot_nli", "sentence_transformers_splade",
                 "ultralytics_yolo_raw", "ultralytics_yolo26_end2end", "optimum_detr_detector",
                 "optimum_clip_zero_shot"}


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("case", [c for c in RUNNABLE if c.name not in JOB_ELSEWHERE],
                         ids=lambda c: c.name)
def test_a_job_with_no_task_block_gives_the_frameworks_outputs(case, tmp_path):
    import ray

    import pipeline

    job = {"name": f"conformance-{case.name}", "input": {"uri": str(case / "sample.parquet")},
           "model": {"uri": str(case / "src")}, "passthrough": ["id"],
           "workers": {"cpu": {"replicas": 1}}, "output": {"uri": str(tmp_path / "out")}}
    if "job_task" in meta(case):  # zero-shot: labels and nothing else
        job["task"] = meta(case)["job_task"]
    if "bad_rows" in meta(case):  # rows the framework scores nothing for either
        job["bad_rows"] = {"max_fraction": 0.5}
    if case.name == CLI_CASE:
        path = tmp_path / "job.json"
        path.write_text(json.dumps(job))
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        done = subprocess.run([sys.executable, "-m", "pipeline.run", str(path), "--no-progress"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    else:
        assert pipeline.run_job(job, progress=False).ok
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    table = pq.read_table(parts[0]) if len(parts) == 1 else \
        pq.ParquetDataset([str(p) for p in parts]).read()
    table = table.sort_by("id")
    rows = pq.read_metadata(case / "sample.parquet").num_rows
    bad = {int(i) for i in meta(case).get("bad_rows", {})}  # in the dead letters
    assert table["id"].to_pylist() == [i for i in range(rows) if i not in bad]
    assert_matches(case, {k: _with_gaps(v, table["id"].to_pylist(), rows)
                          for k, v in table.to_pydict().items()})


def _with_gaps(values: list, ids: list[int], rows: int) -> list:
    """A column of the rows written, with None where a row went to the dead letters."""
    by_id = dict(zip(ids, values, strict=True))
    return [by_id.get(i) for i in range(rows)]


def test_a_remote_model_with_external_data_imports_whole(s3_bucket, s3_options, tmp_path):
    """From object storage: the model and its model.onnx.data are fetched, hashed into the
    bundle and verified; a job's model.uri may name the remote file just the same."""
    import s3fs

    from pipeline.models.importing import open_model

    fs = s3fs.S3FileSystem(**s3_options)
    src = CASES_DIR / "dynamo_multi_output" / "src"
    fs.put(str(src) + "/", f"{s3_bucket}/exports/", recursive=True)
    uri = f"s3://{s3_bucket}/exports/model.onnx"
    done = import_model(uri, tmp_path / "bundle", storage_options=s3_options)
    assert list(done.bundle.spec.external_data) == ["model.onnx.data"]
    assert (tmp_path / "bundle" / "model.onnx.data").read_bytes() == \
        (src / "model.onnx.data").read_bytes()
    bundle, imported = open_model(uri, s3_options)
    assert imported and bundle.spec.external_data == done.bundle.spec.external_data
    (bundle.path / "model.onnx.data").write_bytes(b"\0" * 7200)  # damaged on disk: refused
    with pytest.raises(ModelError, match=r"external data model\.onnx\.data has sha256"):
        open_model(str(bundle.path))


def test_dry_run_prints_what_the_import_of_model_uri_inferred(tmp_path):
    from pipeline.job_file import load_spec
    from pipeline.planning import describe_plan, plan_job

    case = CASES_DIR / "skl2onnx_zipmap"
    planned = plan_job(load_spec({"input": {"uri": str(case / "sample.parquet")},
                                  "model": {"uri": str(case / "src" / "model.onnx")},
                                  "passthrough": ["id"], "output": {"uri": str(tmp_path / "o")}}))
    assert planned.imported and planned.spec.task.kind == "classify"
    assert planned.spec.task.feature_columns == ["sepal_length", "sepal_width", "petal_length",
                                                 "petal_width"]
    text = "\n".join(describe_plan(planned))
    assert "imported into" in text and "labels: ['setosa', 'versicolor', 'virginica']" in text
    assert "repaired: ZipMap node 'ZipMap' removed" in text


def test_score_takes_a_converters_file_and_names_a_feature_count_mismatch(tmp_path):
    import pipeline
    from pipeline.errors import ConfigError
    from pipeline.job_file import load_spec
    from pipeline.planning import plan_job

    case = CASES_DIR / "onnxmltools_lightgbm"
    table = pq.read_table(case / "sample.parquet")
    scored = pipeline.score(table, model=str(case / "src" / "model.onnx"), passthrough=["id"])
    assert scored.column_names == ["id", "label", "score", "probabilities"]
    assert_matches(case, scored.to_pydict())
    extra = table.append_column("note", pa.array(["x"] * table.num_rows))
    pq.write_table(extra, tmp_path / "extra.parquet")
    with pytest.raises(ConfigError, match="has 7 columns besides passthrough, the model takes 6"):
        plan_job(load_spec({"input": {"uri": str(tmp_path / "extra.parquet")},
                            "model": {"uri": str(case / "src")}, "passthrough": ["id"],
                            "output": {"uri": str(tmp_path / "out")}}))


def test_embeddings_cut_to_dimensions_and_quantized_as_sentence_transformers_does():
    """Matryoshka: the first N dimensions re-normalized (truncate_dim with normalized output);
    int8 codes of the unit vectors; binary: sentence-transformers' ubinary (bits of v > 0)."""
    case = CASES_DIR / "sentence_transformers_onnx"
    table = pq.read_table(case / "sample.parquet")
    want = reference(case)["embedding"]
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    cut = want[:, :8] / np.linalg.norm(want[:, :8], axis=1, keepdims=True)

    def scored(**task: Any) -> np.ndarray:
        out = pipeline_score(table, str(case / "src"), {"kind": "embed", **task})
        return np.array(out["embedding"].to_pylist())

    assert np.allclose(scored(dimensions=8), cut, atol=1e-5)
    codes = scored(dimensions=8, quantize="int8")
    assert codes.dtype.kind == "i" and np.abs(codes - cut * 127).max() <= 0.51
    bits = scored(quantize="binary")
    assert bits.shape == (len(want), want.shape[1] // 8)
    assert np.array_equal(bits, np.packbits(want > 0, axis=1))


def pipeline_score(table: pa.Table, model: str, task: dict[str, Any]) -> pa.Table:
    import pipeline

    return pipeline.score(table, model=model, task=task, passthrough=["id"])


def test_clip_zero_shot_asks_for_labels_and_refuses_what_clip_cannot_score():
    from pipeline.errors import ConfigError

    src = str(CASES_DIR / "optimum_clip_zero_shot" / "src")
    table = pq.read_table(CASES_DIR / "optimum_clip_zero_shot" / "sample.parquet")
    refusals = [(None, "task.labels: "), ({"labels": ["box", "bar"], "multi_label": True},
                                         "task.multi_label: CLIP"),
                ({"labels": ["box", "a very long label " * 3]}, "over the model's max_length")]
    for task, words in refusals:
        with pytest.raises(ConfigError, match=words) as refused:
            OnnxPredictor(src, task)(table)
        assert "\n" not in str(refused.value)


def test_a_split_clip_batch_keeps_every_caption():
    """Halving a failing batch (or the one-row health probe) slices the feeds by row: the
    captions are not rows, and each half still scores every label."""
    from pipeline.scoring import LoadedModel
    from pipeline.tasks.base import softmax

    model = LoadedModel(str(CASES_DIR / "optimum_clip_zero_shot" / "src"),
                        {"labels": ["box", "disc", "bar"]})
    table = pq.read_table(CASES_DIR / "optimum_clip_zero_shot" / "sample.parquet")
    batch = next(iter(model.task.prepare(table).batches))
    session = model.session.session
    [whole] = model.task.run_model(session, batch.feeds)
    half = batch.subset(slice(1, None))
    [part] = model.task.run_model(session, half.feeds)
    assert whole.shape == (len(batch), 3) and part.shape == (len(batch) - 1, 3)
    np.testing.assert_allclose(softmax(part), softmax(whole[1:]), atol=1e-5)

"""Bad models get one line each and nothing is written: exit 2 from ``python -m pipeline.models
import``, naming the file and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.models.__main__ import main

CASES = Path(__file__).parent / "cases"
MINILM_TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "minilm" / "tokenizer.json"


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["import", *args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


def tiny_model(path: Path, nodes=None, inputs=None, initializers=()) -> None:
    graph = helper.make_graph(
        nodes or [helper.make_node("Relu", ["x"], ["y"])], "tiny",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def test_a_truncated_model_file(tmp_path, capsys):
    tiny_model(tmp_path / "good.onnx")
    (tmp_path / "model.onnx").write_bytes((tmp_path / "good.onnx").read_bytes()[:40])
    code, err = run(capsys, str(tmp_path / "model.onnx"), "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith(f"error: {tmp_path / 'model.onnx'}: ")
    assert "not an ONNX model" in err and not (tmp_path / "out").exists()


def test_a_file_that_is_no_onnx_at_all(tmp_path, capsys):
    (tmp_path / "model.onnx").write_text("name,value\na,1\n")
    code, err = run(capsys, str(tmp_path / "model.onnx"), "--out", str(tmp_path / "out"))
    assert code == 2 and "model.onnx" in err and "not an ONNX model" in err
    code, err = run(capsys, str(tmp_path), "--out", str(tmp_path / "out"))  # as a folder
    assert code == 2 and "not an ONNX model" in err and not (tmp_path / "out").exists()


def test_a_graph_that_fails_the_checker(tmp_path, capsys):
    tiny_model(tmp_path / "model.onnx", nodes=[helper.make_node("Relu", ["nothing"], ["y"])])
    code, err = run(capsys, str(tmp_path / "model.onnx"), "--out", str(tmp_path / "out"))
    assert code == 2 and "onnx checker failed" in err and "nothing" in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_fit_the_word_embeddings(tmp_path, capsys):
    """A tokenizer of 30,522 tokens beside a model whose embedding table has 100 rows."""
    table = onnx.numpy_helper.from_array(np.zeros((100, 4), np.float32), "word_embeddings")
    tiny_model(tmp_path / "src" / "model.onnx",
               nodes=[helper.make_node("Gather", ["word_embeddings", "input_ids"],
                                       ["last_hidden_state"]),
                      helper.make_node("Identity", ["last_hidden_state"], ["y"])],
               inputs=[helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                     ["batch", "seq"])],
               initializers=[table])
    shutil.copy(MINILM_TOKENIZER, tmp_path / "src" / "tokenizer.json")
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    code, err = run(capsys, str(tmp_path / "src"), "--out", str(tmp_path / "out"))
    assert code == 2 and "tokenizer.json has 30522 tokens" in err
    assert "word embeddings (word_embeddings) 100" in err and not (tmp_path / "out").exists()


def test_a_reference_with_another_row_count(tmp_path, capsys):
    case = CASES / "skl2onnx_zipmap"
    with np.load(case / "reference.npz") as data:
        np.savez(tmp_path / "short.npz", **{k: data[k][:-1] for k in data.files})
    code, err = run(capsys, str(case / "src"), "--out", str(tmp_path / "out"),
                    "--sample", str(case / "sample.parquet"),
                    "--reference", str(tmp_path / "short.npz"))
    assert code == 2 and err.startswith(f"error: --reference {tmp_path / 'short.npz'}: ")
    assert "has 9 rows, the sample 10" in err and not (tmp_path / "out").exists()


def test_strict_refuses_a_graph_that_runs_one_row_per_call(tmp_path, capsys):
    case = CASES / "torchscript_reshape"
    code, err = run(capsys, str(case / "src"), "--out", str(tmp_path / "out"), "--strict")
    assert code == 2 and "does not run batches" in err and "Reshape node" in err
    assert not (tmp_path / "out").exists()


def test_an_ambiguous_model_names_the_choices_and_the_flag(tmp_path, capsys):
    """Token embeddings out and no pooling config: mean or cls, --pooling picks."""
    src = CASES / "sentence_transformers_onnx" / "src"
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    shutil.rmtree(copy / "1_Pooling")
    code, err = run(capsys, str(copy), "--out", str(tmp_path / "out"))
    assert code == 2 and "--pooling mean or --pooling cls" in err
    assert main(["import", str(copy), "--out", str(tmp_path / "out"), "--pooling", "cls"]) == 0
    assert "pooling: cls" in (tmp_path / "out" / "bundle.yaml").read_text()


def test_a_folder_of_several_models_names_the_one_taken_and_model_file_picks(tmp_path, capsys):
    """Optimum's model_quantized.onnx beside model.onnx: model.onnx is taken and named;
    --model-file takes the other, whose dynamic quantization is said (and shown by a dry run
    of a job that names it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from pipeline.job_file import load_spec
    from pipeline.planning import describe_plan, plan_job

    case = CASES / "optimum_text_classifier"
    src = tmp_path / "src"
    shutil.copytree(case / "src", src)
    quantize_dynamic(str(src / "model.onnx"), str(src / "model_quantized.onnx"),
                     weight_type=QuantType.QInt8)
    assert main(["import", str(src), "--out", str(tmp_path / "fp32")]) == 0
    out = capsys.readouterr().out
    assert "model_file" in out and "(model_quantized.onnx too); --model-file picks another" in out
    assert main(["import", str(src), "--out", str(tmp_path / "q"), "--model-file",
                 "model_quantized.onnx"]) == 0
    out = capsys.readouterr().out
    assert "warning: runs one row per call: dynamic quantization (DynamicQuantizeLinear" in out
    assert "quantize statically" in out
    code, err = run(capsys, str(src), "--out", str(tmp_path / "x"), "--model-file", "nope.onnx")
    assert code == 2 and "--model-file nope.onnx: no such .onnx file" in err
    assert "model_quantized.onnx" in err
    planned = plan_job(load_spec({"input": {"uri": str(case / "sample.parquet")},
                                  "model": {"uri": str(src / "model_quantized.onnx")},
                                  "passthrough": ["id"], "output": {"uri": str(tmp_path / "o")}}))
    assert planned.spec.task.kind == "classify" and planned.bundle.spec.max_batch == 1
    assert "warning: runs one row per call: dynamic quantization" in \
        "\n".join(describe_plan(planned))


def test_a_token_classifier_is_never_read_as_a_sentence_classifier(tmp_path, capsys):
    """--task classify is refused at import; a bundle that says classify anyway is refused
    when its scores come back per token, in words rather than a numpy TypeError."""
    import pyarrow as pa

    from pipeline.errors import ModelError
    from pipeline.models.bundle import LocalBundle, open_local_bundle
    from pipeline.spec import BatchingSpec, ClassifyTaskSpec
    from pipeline.tasks import build_task

    src = CASES / "optimum_ner_wordpiece" / "src"
    code, err = run(capsys, str(src), "--out", str(tmp_path / "c"), "--task", "classify")
    assert code == 2 and "one score per token" in err and "--task token-classify" in err
    assert main(["import", str(src), "--out", str(tmp_path / "ner")]) == 0
    bundle = open_local_bundle(tmp_path / "ner", str(tmp_path / "ner"))
    as_classifier = LocalBundle(bundle.path, bundle.spec.model_copy(update={"task": "classify"}),
                                bundle.uri)
    task = build_task(as_classifier, ClassifyTaskSpec(kind="classify", text_column="text"),
                      BatchingSpec(), {"input_ids": "tensor(int64)"})
    batch = next(iter(task.prepare(pa.table({"text": ["Anna lives in Oslo"]})).batches))
    logits = np.zeros((1, len(batch.feeds["input_ids"][0]), 7), np.float32)
    with pytest.raises(ModelError, match=r"needs scores \[rows, labels\], the model gives "
                                         r"\[1, \d+, 7\] \(one per token: a token classifier"):
        task.finish(batch, [logits])


def test_onnxruntimes_reason_is_kept_whole_without_its_source_locations():
    """The locale onnxruntime could not make comes last, after a C++ location: kept."""
    from pipeline.models.checks import runtime_reason

    message = ("[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: "
               "/onnxruntime_src/onnxruntime/core/providers/cpu/text/string_normalizer.cc:235 "
               "onnxruntime::StringNormalizer::Locale::Locale(const std::string&)::<lambda()> "
               "Failed to construct locale with name:en_US.UTF-8:locale::facet::"
               "_S_create_c_locale name not valid:Please, install necessary language-pack-XX "
               "and configure locales\n")
    reason = runtime_reason(message)
    assert reason.startswith("Exception during initialization: Failed to construct locale "
                             "with name:en_US.UTF-8")
    assert reason.endswith("configure locales") and "onnxruntime_src" not in reason
    loaded = runtime_reason("[ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/.x.tmp-1/"
                            "model.onnx failed:Type Error: Type (tensor(float16)) of node (n)")
    assert loaded == "Type Error: Type (tensor(float16)) of node (n)"


def test_a_fill_mask_export_is_named_and_pooled_as_splade_when_asked(tmp_path, capsys):
    """The SPLADE case without its sentence-transformers modules is a plain fill-mask export:
    import says what it is and which flags make it sparse-embed; with them, the same vectors."""
    import pyarrow.parquet as pq

    from pipeline import OnnxPredictor
    from pipeline.import_checks import _compare

    case = CASES / "sentence_transformers_splade"
    src = tmp_path / "fill-mask"
    shutil.copytree(case / "src", src)
    shutil.rmtree(src / "1_SpladePooling")
    (src / "modules.json").unlink()
    (src / "onnx" / "model.onnx").rename(src / "model.onnx")  # where Optimum writes it
    code, err = run(capsys, str(src), "--out", str(tmp_path / "x"))
    assert code == 2 and "a masked language model (BertForMaskedLM" in err
    assert "--task sparse-embed --pooling max" in err
    assert main(["import", str(src), "--out", str(tmp_path / "b"), "--task", "sparse-embed",
                 "--pooling", "max"]) == 0
    assert "repaired: SpladePooling fused into the graph" in capsys.readouterr().out
    out = OnnxPredictor(str(tmp_path / "b"))(pq.read_table(case / "sample.parquet"))
    want = pq.read_table(case / "reference.parquet")["sparse_embedding"].to_pylist()
    assert _compare("sparse_embedding", out["sparse_embedding"].to_pylist(), want, 1e-4,
                    0.9999) is None

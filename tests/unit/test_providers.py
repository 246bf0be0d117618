"""GPU provider settings, checked without a GPU: device ids under Ray, option strings, TensorRT
profiles from batching settings, session config entries, and IOBinding runs on the CPU EP."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper
from tokenizers import Tokenizer

from pipeline.models.onnx_graph import IR_VERSION, OPSET
from pipeline.providers import (
    TensorrtContext,
    assigned_gpu_device_id,
    cuda_options,
    gpu_name,
    graph_input_shapes,
    make_cache_dirs,
    node_placement,
    option_strings,
    placement_summary,
    profile_shapes,
    provider_options,
    run_bound,
    session_config,
    tensorrt_cache_dir,
    tensorrt_options,
)

# -- device ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("environ, ray_ids, expected", [
    ({"CUDA_VISIBLE_DEVICES": "3"}, [3], 0),  # Ray narrowed the visible set to our GPU
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, [3], 1),  # several visible: the Ray id's position
    ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, ["6"], 2),  # ids as strings
    ({}, [2], 2),  # NOSET_CUDA_VISIBLE_DEVICES, all GPUs visible: the Ray id is the index
    ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, ["GPU-bb"], 1),  # UUIDs
    ({"CUDA_VISIBLE_DEVICES": "0"}, [], 0),  # no Ray assignment (driver, tests)
    ({}, [], 0),
    ({"CUDA_VISIBLE_DEVICES": ""}, [1], 0),  # nothing visible: CUDA fails, the fallback reports it
    ({"CUDA_VISIBLE_DEVICES": "5"}, [1], 0),  # unclear: the first visible device
])
def test_assigned_gpu_device_id(environ, ray_ids, expected):
    assert assigned_gpu_device_id(environ, ray_ids) == expected


def test_assigned_gpu_device_id_outside_ray():
    assert assigned_gpu_device_id({"CUDA_VISIBLE_DEVICES": "1,2"}) == 0


def test_gpu_name_asks_nvidia_smi_for_the_visible_device(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H100 80GB HBM3\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert gpu_name(1, {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == "NVIDIA H100 80GB HBM3"
    assert gpu_name(0, {}) == "NVIDIA H100 80GB HBM3"
    assert [c[-1] for c in seen] == ["GPU-bb", "0"]  # nvidia-smi ignores CUDA_VISIBLE_DEVICES

    def no_smi(cmd, **kwargs):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", no_smi)
    assert gpu_name(0, {}) is None


# -- options ---------------------------------------------------------------------------------


def test_cuda_options_defaults_and_user_override():
    assert cuda_options(1) == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                               "cudnn_conv_algo_search": "HEURISTIC",
                               "do_copy_in_default_stream": "1"}
    opts = cuda_options(0, {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": False,
                            "gpu_mem_limit": 2 << 30})
    assert opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert opts["use_tf32"] == "0"  # an int flag for the CUDA EP: "False" would not parse
    assert opts["gpu_mem_limit"] == str(2 << 30)
    assert all(isinstance(v, str) for v in opts.values())


def test_unknown_option_names_the_close_ones():
    with pytest.raises(ValueError, match=r"providers.options.cuda.use_tf_32: .*did you mean use_tf32"):
        cuda_options(0, {"use_tf_32": 1})
    with pytest.raises(ValueError, match="trt_fp16_enable"):
        option_strings("tensorrt", {"trt_fp16": True})
    assert option_strings("cpu", {"anything": True}) == {"anything": "1"}  # not checked


def test_profile_shapes_text_model(minilm_dir: Path):
    spec = yaml.safe_load((minilm_dir / "bundle.yaml").read_text())
    shapes = graph_input_shapes(minilm_dir / "model.onnx")
    assert shapes == {"input_ids": (None, None), "attention_mask": (None, None),
                      "token_type_ids": (None, None)}
    prof = profile_shapes(spec["inputs"], shapes, max_rows=1024, max_tokens=65536, max_length=256)
    names = list(spec["inputs"])
    assert prof["trt_profile_min_shapes"] == ",".join(f"{n}:1x1" for n in names)
    # a box holding both corners of rows x longest <= max_tokens: 1024 short rows, 256 tokens
    assert prof["trt_profile_max_shapes"] == ",".join(f"{n}:1024x256" for n in names)
    assert prof["trt_profile_opt_shapes"] == ",".join(f"{n}:1024x64" for n in names)
    small = profile_shapes(spec["inputs"], shapes, max_rows=128, max_tokens=8192, max_length=256)
    assert small["trt_profile_max_shapes"].startswith("input_ids:128x256,")
    assert small["trt_profile_opt_shapes"].startswith("input_ids:128x64,")
    # fewer tokens than rows: a batch never holds more rows than tokens
    tiny = profile_shapes({"input_ids": "tokens.ids"}, {}, max_rows=256, max_tokens=100,
                          max_length=32)
    assert tiny == {"trt_profile_min_shapes": "input_ids:1x1",
                    "trt_profile_opt_shapes": "input_ids:100x1",
                    "trt_profile_max_shapes": "input_ids:100x32"}


def test_profile_shapes_static_dims_and_unknowns():
    roles = {"features": "features"}
    assert profile_shapes(roles, {"features": (None, 30)}, 512, 16384, None) == {
        "trt_profile_min_shapes": "features:1x30", "trt_profile_opt_shapes": "features:512x30",
        "trt_profile_max_shapes": "features:512x30"}
    # a text model exported with a fixed length keeps it; a fixed batch stays fixed
    fixed = profile_shapes({"ids": "tokens.ids"}, {"ids": (None, 128)}, 64, 4096, 256)
    assert fixed["trt_profile_max_shapes"] == "ids:64x128"
    assert fixed["trt_profile_opt_shapes"] == "ids:32x128"
    assert profile_shapes(roles, {"features": (8, 30)}, 512, 16384, None)[
        "trt_profile_max_shapes"] == "features:8x30"
    # a dynamic dim we cannot bound, or no shape at all: no explicit profile (a partial one fails)
    assert profile_shapes({"img": "column:img"}, {"img": (None, 3, None, None)}, 8, 1, None) == {}
    assert profile_shapes({"x": "column:x"}, {}, 8, 1, None) == {}
    assert profile_shapes({}, {}, 8, 1, None) == {}


def test_tensorrt_options(tmp_path: Path):
    cache = tensorrt_cache_dir(tmp_path, "ab" * 32, "NVIDIA H100 80GB HBM3", "1.31.1")
    assert cache == tmp_path / "tensorrt" / f"{'ab' * 8}-ort1.31.1-NVIDIA-H100-80GB-HBM3"
    assert tensorrt_cache_dir(tmp_path, "cd" * 32, None).name.endswith("-unknown-gpu")
    roles = {"features": "features"}
    opts = tensorrt_options(0, cache, roles, 512, 16384, None, None, {"features": (None, 30)})
    assert opts["trt_fp16_enable"] == opts["trt_engine_cache_enable"] == "1"
    assert opts["trt_timing_cache_enable"] == "1"
    assert opts["trt_timing_cache_path"] == str(cache / "timing")
    assert opts["trt_engine_cache_path"].startswith(str(cache / "engines-"))
    assert opts["trt_profile_opt_shapes"] == "features:512x30"
    # other batching or precision: another engine folder, the same timing cache
    other = tensorrt_options(0, cache, roles, 64, 16384, None, {"trt_fp16_enable": False},
                             {"features": (None, 30)})
    assert other["trt_fp16_enable"] == "0"
    assert other["trt_engine_cache_path"] != opts["trt_engine_cache_path"]
    # the job's own settings win, paths included
    mine = tensorrt_options(2, cache, roles, 512, 16384, None,
                            {"trt_engine_cache_path": "/x", "trt_profile_max_shapes": "features:9x30"},
                            {"features": (None, 30)})
    assert mine["trt_engine_cache_path"] == "/x"
    assert mine["trt_profile_max_shapes"] == "features:9x30"
    assert mine["device_id"] == "2"
    make_cache_dirs(opts)
    assert Path(opts["trt_engine_cache_path"]).is_dir() and (cache / "timing").is_dir()


def test_provider_options_for_a_chain(tmp_path: Path):
    ctx = TensorrtContext(tmp_path, {"ids": "tokens.ids"}, {"ids": (None, None)}, 8, 64, 16)
    out = provider_options(("tensorrt", "cuda", "cpu"), {"cuda": {"use_tf32": 0}}, 3, ctx)
    assert list(out) == ["tensorrt", "cuda", "cpu"]
    assert out["tensorrt"]["device_id"] == out["cuda"]["device_id"] == "3"
    assert out["tensorrt"]["trt_profile_max_shapes"] == "ids:8x16"
    assert out["cuda"]["use_tf32"] == "0" and out["cpu"] == {}


# -- session config ----------------------------------------------------------------------------


def test_session_config():
    assert session_config(("cpu",)) == {"session.intra_op.allow_spinning": "1"}
    gpu = session_config(("cuda", "cpu"))
    assert gpu == {"session.intra_op.allow_spinning": "0",
                   "session.record_ep_graph_assignment_info": "1"}
    assert session_config(("tensorrt", "cuda"), strict=True)[
        "session.disable_cpu_ep_fallback"] == "1"
    with pytest.raises(ValueError, match="cannot list cpu"):
        session_config(("cuda", "cpu"), strict=True)
    with pytest.raises(ValueError, match="GPU provider first"):
        session_config(("cpu",), strict=True)


def _options(config: dict[str, str]) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return opts


def test_strict_session_refuses_cpu_placement(tiny_model: Path):
    """What onnxruntime does with disable_cpu_ep_fallback, here where CUDA cannot run: with
    the CPU EP listed it refuses the configuration; without it, it refuses the CPU nodes."""
    with pytest.raises(Exception, match="Conflicting session configuration"):
        ort.InferenceSession(str(tiny_model), _options({"session.disable_cpu_ep_fallback": "1"}),
                             providers=["CPUExecutionProvider"], enable_fallback=0)
    # The project installs onnxruntime-gpu, which lists CUDA whether or not it can load.
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    config = session_config(("cuda",), strict=True)
    try:
        session = ort.InferenceSession(str(tiny_model), _options(config),
                                       providers=["CUDAExecutionProvider"], enable_fallback=0)
    except Exception as exc:  # no GPU here: every node would fall back to the CPU
        assert "fallback to CPU EP has been explicitly disabled" in str(exc)
    else:  # a machine with a working GPU: the whole tiny graph runs there
        assert session.get_providers()[0] == "CUDAExecutionProvider"


def test_node_placement(tiny_model: Path):
    config = {"session.record_ep_graph_assignment_info": "1"}
    session = ort.InferenceSession(str(tiny_model), _options(config),
                                   providers=["CPUExecutionProvider"])
    placed = node_placement(session)
    assert placed == {"cpu": {"MatMul": 1, "Relu": 1, "Add": 1}}
    assert placement_summary(placed) == "cpu 3 nodes"
    assert placement_summary({"cuda": {"MatMul": 40}, "cpu": {"Shape": 2, "Gather": 1}}) == \
        "cuda 40 nodes, cpu 3 nodes (Shape 2, Gather 1)"
    plain = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    assert node_placement(plain) == {}


# -- IOBinding ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """y = relu(x @ w), z = y + 1: two outputs, so that binding only one of them is tested."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
         helper.make_node("Add", ["y", "one"], ["z"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], w.ravel().tolist()),
         helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def test_run_bound_tiny_model(tiny_model: Path):
    assert graph_input_shapes(tiny_model) == {"x": (None, 4)}
    session = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    for names in (["z"], ["y", "z"], ["z", "y"]):
        bound = run_bound(session, names, {"x": x})
        plain = session.run(names, {"x": x})
        assert len(bound) == len(names)
        for b, p in zip(bound, plain, strict=True):
            np.testing.assert_array_equal(b, p)
    # a non-contiguous view is fed as its values
    wide = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_bound(session, ["y"], {"x": wide[:, ::2]})[0],
                                  session.run(["y"], {"x": np.ascontiguousarray(wide[:, ::2])})[0])


def test_run_bound_minilm(minilm_dir: Path):
    spec = yaml.safe_load((minilm_dir / "bundle.yaml").read_text())
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.enable_padding()
    texts = ["a short one", "GPU batch inference with ONNX Runtime and Ray actors",
             "the quick brown fox jumps over the lazy dog " * 3]
    enc = tokenizer.encode_batch(texts)
    fields = {"tokens.ids": "ids", "tokens.attention_mask": "attention_mask",
              "tokens.type_ids": "type_ids"}
    feeds = {name: np.array([getattr(e, fields[role]) for e in enc], dtype=np.int64)
             for name, role in spec["inputs"].items()}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(minilm_dir / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    output = spec["outputs"]["embedding"]
    bound = run_bound(session, [output], feeds, "cpu", 0)[0]
    assert bound.shape == (3, 384) and bound.dtype == np.float32
    np.testing.assert_array_equal(bound, session.run([output], feeds)[0])

"""Text generation end to end, on the conformance case's tiny Llama (Optimum's export with its
KV cache): a job resumes exactly once after its driver is killed and dead-letters a prompt
longer than the context window by id; stop strings, sampling with a seed and the settings'
checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.errors import ConfigError
from tests.conformance.test_conformance import CASES_DIR

CASE = CASES_DIR / "optimum_causal_llama"
MODEL = str(CASE / "src")
# Both runtimes: the pipeline's loop on an Optimum export, onnxruntime-genai on a builder's.
MODELS = {"onnx-causal": MODEL, "genai": str(CASES_DIR / "genai_builder_llama" / "src")}
RUNTIMES = pytest.mark.parametrize("model", list(MODELS.values()), ids=list(MODELS))
REPO = Path(__file__).resolve().parents[2]


def prompts() -> list[str]:
    return pq.read_table(CASE / "sample.parquet")["prompt"].to_pylist()


def reference() -> dict[str, str]:
    """The prompt -> transformers' greedy text (12 new tokens at most)."""
    texts = pq.read_table(CASE / "reference.parquet")["generated"].to_pylist()
    return dict(zip(prompts(), texts, strict=True))


def generated(table: pa.Table, model: str = MODEL, **task) -> pa.Table:
    return pipeline.score(table, model=model, task={"kind": "generate", **task},
                          passthrough=["id"])


@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_driver_resumes_exactly_once_and_an_overlong_prompt_is_dead_lettered(tmp_path):
    import ray

    data = tmp_path / "in"
    data.mkdir()
    texts = prompts()
    long_prompt = " ".join(["the cat eats fish in the barn ."] * 12)  # about 100 tokens
    rows = [(i, texts[i % len(texts)]) for i in range(24)]
    rows[13] = (13, long_prompt)
    for part in range(3):
        chunk = rows[part * 8:(part + 1) * 8]
        pq.write_table(pa.table({"id": [r[0] for r in chunk], "prompt": [r[1] for r in chunk]}),
                       data / f"{part}.parquet")
    spec = {"name": "generate", "input": {"uri": str(data)}, "model": {"uri": MODEL},
            "task": {"kind": "generate", "max_new_tokens": 12}, "passthrough": ["id"],
            "sharding": {"rows_per_shard": 8}, "workers": {"cpu": {"replicas": 1}},
            "bad_rows": {"max_fraction": 0.5}, "output": {"uri": str(tmp_path / "out")}}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PIPELINE_FAULTS": json.dumps([{"point": "worker.start", "action": "sleep",
                                           "seconds": 1.5}])}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.run", str(tmp_path / "job.json"),
                               "--no-progress"], cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = tmp_path / "out" / "_pipeline" / "shards"
    deadline = time.monotonic() + 240
    while driver.poll() is None and not list(markers.glob("*.json")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, "the driver ended before any shard committed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    committed = {p.name: p.read_bytes() for p in markers.glob("*.json")}
    assert 1 <= len(committed) < 3

    result = pipeline.run_job(spec, progress=False)
    assert result.ok and result.report["totals"]["resumed"] == len(committed)
    assert {p.name: p.read_bytes() for p in markers.glob("*.json")
            if p.name in committed} == committed  # what was committed is not redone
    table = result.read().sort_by("id")
    assert table["id"].to_pylist() == [i for i in range(24) if i != 13]  # each once
    want = reference()
    assert table["generated"].to_pylist() == [want[p] for i, p in rows if i != 13]
    dead = pq.read_table(next((tmp_path / "out" / "_pipeline" / "dead_letter").glob("*.parquet")))
    assert dead["id"].to_pylist() == [13]
    [reason] = dead["_reason"].to_pylist()
    assert reason.startswith("prompt is ") and "context window is 64" in reason


@RUNTIMES
def test_stop_strings_cut_the_text_and_end_it(model):
    table = pa.table({"id": [0, 1], "prompt": ["the cat", "count one two"]})
    out = generated(table, model, max_new_tokens=12, stop=[" in", "six"]).to_pylist()
    assert out[0]["generated"] == " eats fish" and out[0]["finish_reason"] == "stop"
    assert out[1]["generated"] == " three four five " and out[1]["finish_reason"] == "stop"
    # The tokens written up to the one that completed the stop string, not all 12.
    full = generated(table, model, max_new_tokens=12).to_pylist()
    assert all(o["tokens_out"] < f["tokens_out"] for o, f in zip(out, full, strict=True))
    short = generated(table, model, max_new_tokens=2).to_pylist()
    assert [o["finish_reason"] for o in short] == ["length", "length"]
    assert [o["tokens_out"] for o in short] == [2, 2]


@RUNTIMES
def test_sampling_with_a_seed_gives_each_row_the_same_text_in_any_batch(model):
    table = pa.table({"id": np.arange(14), "prompt": prompts()})
    sampled = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 50, "seed": 7}
    first = generated(table, model, **sampled)["generated"].to_pylist()
    one_by_one = pipeline.score(table, model=model, task={"kind": "generate", **sampled},
                                passthrough=["id"], batching={"max_rows": 1})
    assert one_by_one["generated"].to_pylist() == first
    other = generated(table, model, **{**sampled, "seed": 8})["generated"].to_pylist()
    assert other != first  # the seed matters
    greedy = generated(table, model, max_new_tokens=8)["generated"].to_pylist()
    assert greedy != first  # and sampling at 1.5 leaves the greedy path somewhere


def test_sampling_settings_without_a_temperature_are_refused():
    table = pa.table({"id": [0], "prompt": ["the cat"]})
    with pytest.raises(ConfigError, match="set temperature above 0"):
        generated(table, top_p=0.9)


def test_bad_messages_are_row_errors_and_chat_needs_a_template(tmp_path):
    messages = pa.array([[{"role": "user", "content": "the cat"}],
                         [{"role": "robot", "content": "the dog"}], None, []],
                        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    table = pa.table({"id": [0, 1, 2, 3], "messages": messages})
    out = generated(table, max_new_tokens=12, messages_column="messages")
    errors = out["_error"].to_pylist()
    assert errors[0] is None and out["generated"][0].as_py() == reference_chat()["the cat"]
    assert errors[1].startswith("messages: message 0 needs a role (system, user, assistant")
    assert errors[2] == "messages is null"
    assert errors[3] == "messages: messages must be a list of {role, content} (non-empty)"
    # A model without a chat template: the job is refused before it starts.
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in (CASE / "src").iterdir():
        if path.name != "chat_template.jinja":
            (bare / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ConfigError, match="has no chat template"):
        pipeline.score(table, model=str(bare), task={"kind": "generate", "chat": True})


def reference_chat() -> dict[str, str]:
    texts = pq.read_table(CASE / "reference.parquet")["generated_chat"].to_pylist()
    return dict(zip(prompts(), texts, strict=True))


@RUNTIMES
def test_json_schema_holds_every_text_to_it_or_dead_letters_the_row(model):
    import jsonschema

    schema = {"type": "object", "additionalProperties": False, "required": ["animal", "legs"],
              "properties": {"animal": {"type": "string", "enum": ["cat", "dog", "owl"]},
                             "legs": {"type": "integer", "minimum": 0, "maximum": 8}}}
    table = pa.table({"id": np.arange(14), "prompt": prompts()})
    out = generated(table, model, max_new_tokens=40, json_schema=schema).to_pylist()
    for row in out:  # the tiny model never saw JSON: the grammar alone makes it valid
        jsonschema.validate(json.loads(row["generated"]), schema)
        assert row["finish_reason"] == "schema"
    cut = generated(table, model, max_new_tokens=4, json_schema=schema)
    assert set(cut["_error"].to_pylist()) == {
        "response is not JSON (cut at max_new_tokens): Unterminated string starting at: "
        "line 1 column 2 (char 1)"}
    with pytest.raises(ConfigError, match=r"task\.json_schema: not a valid JSON schema"):
        generated(table, json_schema={"type": "no-such-type"})


def test_a_prompt_holding_genais_pad_id_is_a_row_error_there_only():
    # The tokenizer reads "</s>" in a text as its special token, onnxruntime-genai's pad id.
    table = pa.table({"id": [0, 1], "prompt": ["the cat </s> the dog", "the cat"]})
    genai = generated(table, MODELS["genai"], max_new_tokens=4)
    assert genai["_error"].to_pylist()[0].startswith("prompt holds token 2, onnxruntime-genai's")
    assert genai["_error"].to_pylist()[1] is None
    plain = generated(table, MODEL, max_new_tokens=4)
    assert "_error" not in plain.column_names  # positions come from the mask, not the ids

"""The generation loop on the conformance case's tiny Llama: left padding, rows leaving the
batch as they end, and the sampling filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.models.decoding import (
    LENGTH,
    STOP,
    CacheLayout,
    Sampling,
    _choose,
    generate,
    left_padded,
)

MODEL = Path(__file__).resolve().parents[1] / "conformance" / "cases" / "optimum_causal_llama" \
    / "src" / "model.onnx"


class Recording:
    """The real session, with the batch size of each call written down."""

    def __init__(self, session) -> None:
        self.session = session
        self.rows: list[int] = []

    def run(self, names, feeds):
        self.rows.append(len(feeds["input_ids"]))
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_prompts_are_padded_on_the_left():
    ids, mask = left_padded([[5, 6, 7], [8]], pad=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rows_that_end_leave_the_batch_and_cost_no_more_steps():
    session = Recording(ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]))
    layout = CacheLayout.of(session)
    prompts = [[1, 20, 30], [1, 40], [1, 20, 30, 50]]
    ids, mask = left_padded(prompts, pad=2)
    results = generate(session, layout, ids, mask, [0, 1, 2], Sampling(max_new_tokens=6),
                       eos=set(), room=[1, 3, 6])
    assert [len(r.ids) for r in results] == [1, 3, 6]
    assert all(r.reason == LENGTH for r in results)
    # One call for the prompts, then only the rows still writing.
    assert session.rows == [3, 2, 2, 1, 1, 1]
    # The same tokens as each prompt alone.
    for i, prompt in enumerate(prompts):
        alone = generate(session, layout, *left_padded([prompt], 2), [i],
                         Sampling(max_new_tokens=6), set(), [len(results[i].ids)])[0]
        assert alone.ids == results[i].ids
    first = results[2].ids[0]
    ended = generate(session, layout, *left_padded([prompts[2]], 2), [0],
                     Sampling(max_new_tokens=6), eos={first}, room=[6])[0]
    assert ended.ids == [first] and ended.reason == STOP


def test_sampling_filters_follow_transformers_order():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    assert _choose(logits, Sampling(4), None) == 0  # greedy
    top1 = Sampling(4, temperature=1.0, top_k=1)
    assert {_choose(logits, top1, rng) for _ in range(50)} == {0}
    nucleus = Sampling(4, temperature=1.0, top_p=0.75)  # 0.5 + 0.3 reach it: two tokens
    assert {_choose(logits, nucleus, rng) for _ in range(200)} == {0, 1}
    draws = [_choose(logits, Sampling(4, temperature=1.0), rng) for _ in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    hot = [_choose(logits, Sampling(4, temperature=100.0), rng) for _ in range(4000)]
    assert np.bincount(hot, minlength=4).min() > 800  # nearly uniform

"""A generation loop on onnxruntime for a causal LM exported with its KV cache (Optimum's
``text-generation-with-past``: ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.<i>.key|value`` in; ``logits`` and ``present.<i>.key|value`` out).

As transformers' ``generate`` runs a left-padded batch: prompts padded on the left, each
row's positions counted from its first real token (``cumsum(mask) - 1``, pads at 1), the
first step over the whole prompts with an empty cache, then one token a step with the cache
carried over. A row that ends (its end-of-sequence token, a stop string, ``max_new_tokens``,
or the context window) leaves the batch: its rows of the cache are dropped, so it costs no
further steps.

Sampling follows ``generate``'s order (temperature, top-k, top-p, then a draw). Each row draws
from its own generator, seeded by the job's seed and the row's key: a row gets the same text
whatever batch it runs in, so a retried shard gives the same text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
CACHE_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
STOP, LENGTH, SCHEMA, FAILED = 0, 1, 2, 3  # why a row ended (SCHEMA: its JSON is complete)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class CacheLayout:
    """The graph's cache inputs and the outputs that carry them to the next step."""

    pasts: list[str]  # past_key_values.<i>.key|value, in graph order
    presents: list[str]  # present.<i>.key|value, the same order
    shapes: list[tuple[int, int]]  # (kv heads, head dim) of each past input
    dtype: np.dtype
    position_ids: bool  # the graph takes position_ids

    @classmethod
    def of(cls, session) -> CacheLayout:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        pasts = [n for n in inputs if PAST.match(n)]
        presents = [PAST.sub(lambda m: f"present.{m.group(1)}.{m.group(2)}", n) for n in pasts]
        missing = [p for p in presents if p not in outputs]
        if not pasts or missing:
            raise ValueError("the graph has no KV cache to carry (" +
                             (f"no output {missing[0]}" if missing else
                              "no past_key_values inputs") + ")")
        shapes = []
        for name in pasts:
            dims = inputs[name].shape
            if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
                raise ValueError(f"cache input {name} is {dims}; the loop carries caches of "
                                 "[batch, kv heads, tokens, head size] with fixed heads and size")
            shapes.append((int(dims[1]), int(dims[3])))
        kind = inputs[pasts[0]].type
        if kind not in CACHE_TYPES:
            raise ValueError(f"cache input {pasts[0]} is {kind}; the loop carries "
                             f"{' or '.join(CACHE_TYPES)}")
        return cls(pasts, presents, shapes, np.dtype(CACHE_TYPES[kind]),
                   "position_ids" in inputs)


@dataclass
class Generated:
    ids: list[int]  # new tokens, the one that ended the text included
    reason: int  # STOP, LENGTH, SCHEMA or FAILED
    error: str | None = None  # why the row failed (its constraint refused every token)


def generate(session, layout: CacheLayout, input_ids: np.ndarray, attention_mask: np.ndarray,
             keys: list[int], sampling: Sampling, eos: set[int], room: list[int],
             stopped: Callable[[int, list[int]], bool] | None = None,
             constraints: list[Any] | None = None) -> list[Generated]:
    """New tokens for each row of a left-padded batch. ``room[i]``: tokens row i may add
    before the context window is full (at most ``max_new_tokens``); ``stopped(i, ids)``:
    whether row i's text now holds a stop string; ``constraints[i]``: row i's grammar
    (``pipeline.models.constrained.RowConstraint``), which masks the logits each step."""
    rows = len(input_ids)
    results = [Generated([], LENGTH) for _ in range(rows)]
    rngs = [np.random.default_rng([sampling.seed, key]) for key in keys] \
        if sampling.temperature > 0 else []
    active = np.arange(rows)
    mask = attention_mask.astype(np.int64)
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)
    past = {name: np.zeros((rows, heads, 0, dim), layout.dtype)
            for name, (heads, dim) in zip(layout.pasts, layout.shapes, strict=True)}
    step_ids = input_ids.astype(np.int64)
    while len(active):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if layout.position_ids:
            feeds["position_ids"] = positions
        logits, *presents = session.run(["logits", *layout.presents], feeds)
        last = np.asarray(logits[:, -1, :], dtype=np.float32)
        keep, chosen = [], []
        for j, row in enumerate(active):
            token = _next_token(last[j], results[row], int(row), sampling,
                                rngs[row] if rngs else None, eos, room[row], stopped,
                                constraints[row] if constraints else None)
            if token is not None:
                keep.append(j)
                chosen.append(token)
        if not keep:
            break
        index = np.asarray(keep)
        active = active[index]
        step_ids = np.asarray(chosen, np.int64)[:, None]
        mask = np.concatenate([mask[index], np.ones((len(index), 1), np.int64)], axis=1)
        positions = positions[index, -1:] + 1
        past = {name: present[index] for name, present in
                zip(layout.pasts, presents, strict=True)}
    return results


def _next_token(scores: np.ndarray, done: Generated, row: int, sampling: Sampling,
                rng: np.random.Generator | None, eos: set[int], room: int,
                stopped: Callable[[int, list[int]], bool] | None,
                constraint: Any | None) -> int | None:
    """One row's next token, appended to ``done``; the token when the row goes on, None when
    it ended (``done.reason`` says why)."""
    if constraint is not None:
        allowed = constraint.allowed(len(scores))
        if not allowed.any():
            done.reason, done.error = FAILED, "the schema's grammar allows no token"
            return None
        scores = np.where(allowed, scores, -np.inf)
    token = _choose(scores, sampling, rng)
    done.ids.append(token)
    complete = False
    if constraint is not None and token not in eos:
        try:
            complete = constraint.take(token)
        except ValueError as exc:
            done.reason, done.error = FAILED, str(exc)
            return None
    if token in eos or (stopped is not None and stopped(row, done.ids)):
        # An end-of-sequence token the grammar allowed ends a complete text too.
        done.reason = SCHEMA if constraint is not None and token in eos else STOP
    elif complete:
        done.reason = SCHEMA
    elif len(done.ids) >= room:
        done.reason = LENGTH
    else:
        return token
    return None


def _choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
    if rng is None:
        return int(np.argmax(logits))
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < len(scores):
        cut = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < cut, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest set whose mass reaches top_p (the first token always).
        drop = order[np.concatenate([[False], cumulative[:-1] >= sampling.top_p])]
        probs[drop] = 0.0
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def left_padded(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    return ids, mask


def batch_agrees(greedy: Callable[[list[list[int]], int], list[Generated]],
                 prompts: list[list[int]], new_tokens: int = 4) -> str | None:
    """None when ``greedy(prompts, new_tokens)`` (a runtime's greedy generation) gives each
    prompt in a batch the tokens it gets alone; else which prompt differs and how."""
    together = greedy(prompts, new_tokens)
    for i, prompt in enumerate(prompts):
        alone = greedy([prompt], new_tokens)[0]
        if alone.ids != together[i].ids:
            return f"prompt {i} ({len(prompt)} tokens) gives {together[i].ids} in a batch of " \
                   f"{len(prompts)} and {alone.ids} alone"
    return None

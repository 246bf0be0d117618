"""Generation with onnxruntime-genai's own generator and KV cache, run the way that gives
each prompt the tokens transformers' ``generate`` gives it alone.

Traps found with a model its builder made (``tests/conformance/cases/genai_builder_llama``):

- **Padding.** The builder's graph has no ``position_ids``: positions come from the attention
  mask, counting real tokens first. Prompts padded on the right (with the pad id) match
  transformers row for row; padded on the left, 4 of the case's 14 prompts came out
  different. So prompts are padded on the right.
- **Batch size.** Without ``batch_size`` in the search options a ``[B, L]`` prompt tensor is
  one sequence. It is always set, and a batch holds 32 prompts at most.
- **Lengths.** ``max_length`` counts the padded prompt, and every row shares it: a row may add
  ``max_length`` minus the longest prompt. A batch whose rows need more room than that near
  the context window runs its prompts one at a time.
- **Reading tokens.** ``get_sequence`` leaves out the end-of-sequence token that finished
  the last row, so tokens are read step by step (``get_next_tokens``).
- **Sampling.** One generator draws for the whole batch, so a row's text would depend on its
  batch-mates: with sampling, each prompt runs alone with a seed from the job's seed and the
  row.

Rows that end keep their slot in onnxruntime-genai's static batch (it stops when all end), so
they still cost decode steps; the loop stops reading them and ends when every row has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.models.decoding import LENGTH, SCHEMA, STOP, Generated, Sampling

MAX_BATCH = 32


def genai_generate(session: Any, prompts: list[list[int]], keys: list[int],
                   sampling: Sampling, eos: set[int], room: list[int], pad: int,
                   context: int, stopped: Callable[[int, list[int]], bool] | None = None,
                   schema: dict[str, Any] | None = None) -> list[Generated]:
    """New tokens for each prompt (``room[i]`` at most), as ``decoding.generate`` gives them."""
    results: list[Generated] = []
    alone = sampling.temperature > 0 or \
        max(len(p) for p in prompts) + max(room) > context
    step = 1 if alone else MAX_BATCH
    for start in range(0, len(prompts), step):
        part = slice(start, start + step)
        seed = (keys[start] ^ sampling.seed) % (2**31 - 1) if alone else sampling.seed

        def stop_rule(i: int, ids: list[int], offset: int = start) -> bool:
            return stopped is not None and stopped(offset + i, ids)

        results += _run(session, prompts[part], room[part], sampling, seed, eos, pad,
                        stop_rule, schema)
    return results


def _run(session: Any, prompts: list[list[int]], room: list[int], sampling: Sampling,
         seed: int, eos: set[int], pad: int, stopped: Callable[[int, list[int]], bool],
         schema: dict[str, Any] | None) -> list[Generated]:
    og = session.og
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt  # on the right: see the module's doc
    params = og.GeneratorParams(session.model)
    options: dict[str, Any] = {"batch_size": len(prompts), "max_length": width + max(room),
                               "do_sample": sampling.temperature > 0}
    if sampling.temperature > 0:
        options.update(temperature=sampling.temperature, top_k=sampling.top_k,
                       top_p=sampling.top_p, random_seed=int(seed))
    params.set_search_options(**options)
    if schema is not None:  # compact JSON, as our own loop holds it (llguidance's x-guidance)
        params.set_guidance("json_schema", json.dumps(
            {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}))
    generator = og.Generator(session.model, params)
    generator.append_tokens(tokens)
    results = [Generated([], LENGTH) for _ in prompts]
    active = list(range(len(prompts)))
    while active and not generator.is_done():
        generator.generate_next_token()
        chosen = generator.get_next_tokens()
        still = []
        for i in active:
            token = int(chosen[i])
            done = results[i]
            done.ids.append(token)
            if token in eos or stopped(i, done.ids):
                # With a schema the grammar forces the end-of-sequence token once it is done.
                done.reason = SCHEMA if schema is not None and token in eos else STOP
            elif len(done.ids) >= room[i]:
                done.reason = LENGTH
            else:
                still.append(i)
        active = still
    for i in active:  # the generator ended them: its grammar was complete
        results[i].reason = SCHEMA if schema is not None else LENGTH
    return results

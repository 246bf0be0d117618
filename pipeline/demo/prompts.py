"""Prompts for the generation demo: beginnings of the sentences and counts the tiny demo
language model (the conformance case's Llama, built by onnxruntime-genai's model builder) was
trained on, so its answers finish them."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "yak"]
NUMBERS = ["one", "two", "three", "four", "five", "six"]


def make_prompts(rows: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(rows):
        if rng.random() < 0.7:
            animal = rng.choice(ANIMALS)
            prompts.append(rng.choice([f"the {animal}", f"the {animal} eats"]))
        else:
            prompts.append("count " + " ".join(NUMBERS[:rng.randint(0, 4)]))
    return [p.strip() for p in prompts]


def write_prompt_data(out: Path, rows: int, files: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(rows)
    per_file = -(-rows // files) if rows else 0
    for i in range(files):
        part = prompts[i * per_file:(i + 1) * per_file]
        ids = list(range(i * per_file, i * per_file + len(part)))
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": part}),
                       out / f"prompts-{i}.parquet")

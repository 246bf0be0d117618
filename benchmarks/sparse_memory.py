"""Worker memory of SPLADE scoring: the pipeline (pooling fused into the graph at import,
token budget capped by the vocabulary) against the unfused export run as users run it today
(``[batch, tokens, 30522]`` logits out, pooled in numpy), on the same texts, each in its own
process (peak RSS from /proc, after scoring).

    python -m benchmarks.sparse_memory [--texts 2000] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.throughput import peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / "tests" / "conformance" / "cases" / "sentence_transformers_splade" / "src"
TEXT = ("sparse retrieval keeps the words that matter and drops the rest while dense "
        "vectors blur them together across every dimension of the space")
WORDS = TEXT.split(" ")


def texts(count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30 + i % 10))
            for i in range(count)]


def pipeline_side(count: int) -> dict:
    import pipeline

    started = time.perf_counter()
    out = pipeline.score(pa.table({"text": texts(count)}), model=str(CASE), task="sparse-embed")
    return {"seconds": time.perf_counter() - started, "rows": out.num_rows,
            "nonzero": int(np.mean([len(v["indices"]) for v in out["sparse_embedding"]
                                    .to_pylist()]))}


def unfused_side(count: int, batch: int) -> dict:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(CASE / "tokenizer.json"))
    tokenizer.enable_truncation(40)
    tokenizer.enable_padding()
    session = ort.InferenceSession(str(CASE / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    rows = texts(count)
    nonzero = []
    for start in range(0, count, batch):
        enc = tokenizer.encode_batch(rows[start:start + batch])
        feeds = {"input_ids": np.array([e.ids for e in enc]),
                 "attention_mask": np.array([e.attention_mask for e in enc]),
                 "token_type_ids": np.array([e.type_ids for e in enc])}
        logits = session.run(["logits"], feeds)[0]
        pooled = (np.log1p(np.maximum(logits * feeds["attention_mask"][..., None], 0))
                  .max(axis=1))
        nonzero += list((pooled > 0).sum(axis=1))
    return {"seconds": time.perf_counter() - started, "rows": count,
            "nonzero": int(np.mean(nonzero))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", choices=["pipeline", "unfused"])
    args = parser.parse_args()
    if args.child:
        result = pipeline_side(args.texts) if args.child == "pipeline" else \
            unfused_side(args.texts, args.batch)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    print(f"{args.texts:,} texts of 32-41 tokens, SPLADE over a 30,522-word vocabulary\n")
    print("| variant | peak RSS (MB) | rows/s | nonzero weights a row |")
    print("|---|---|---|---|")
    for kind in ("pipeline", "unfused"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.sparse_memory", "--child", kind,
                               "--texts", str(args.texts), "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True, cwd=REPO)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        name = "pipeline (fused, capped budget)" if kind == "pipeline" else \
            f"unfused logits, batches of {args.batch}"
        print(f"| {name} | {r['peak_rss_mb']:,.0f} | {r['rows'] / r['seconds']:,.0f} | "
              f"{r['nonzero']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

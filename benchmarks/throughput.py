"""Throughput of text embedding: our length-sorted token-budget batching vs common baselines.

    python -m benchmarks.throughput [--rows 2000] [--model models/minilm]   (make bench)

All variants use the same ONNX Runtime session, the same texts and the same thread count,
measured in the same run, so the ratios compare batching policies, not machines:

- fixed-pad: batches of 64 rows padded to max_length (Spark UDF / batch-transform style)
- pad-longest: batches of 64 rows in input order, padded to the longest row (HF default)
- ours: rows sorted by length, batches cut by a token budget, input order restored
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa

from pipeline.demo.text import make_text_table
from pipeline.inference import score_table
from pipeline.models.bundle import fetch_bundle
from pipeline.sessions import SessionSettings, create_session
from pipeline.spec import BatchingSpec, EmbedTaskSpec
from pipeline.tasks import build_task
from pipeline.tasks.text import load_tokenizer


def run_baseline(session, tokenizer, texts: list[str], pad_to: int | None, batch: int) -> np.ndarray:
    outputs = []
    for start in range(0, len(texts), batch):
        encodings = tokenizer.encode_batch(texts[start:start + batch])
        width = pad_to or max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
            mask[i, :len(e.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        outputs.append(session.run(None, feeds)[0])
    return np.concatenate(outputs)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--model", default="models/minilm")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    texts = make_text_table(args.rows, seed=11)["text"].to_pylist()
    bundle = fetch_bundle(args.model)
    loaded = create_session(str(bundle.model_path),
                            SessionSettings(intra_op_threads=args.threads))
    max_length = bundle.spec.text.max_length
    tokenizer = load_tokenizer(str(bundle.tokenizer_path), max_length)
    task = build_task(bundle, EmbedTaskSpec(kind="embed"), BatchingSpec(), {})
    run_baseline(loaded.session, tokenizer, texts[:64], None, 64)  # warm-up

    fixed_s, fixed = timed(lambda: run_baseline(loaded.session, tokenizer, texts, max_length, 64))
    longest_s, longest = timed(lambda: run_baseline(loaded.session, tokenizer, texts, None, 64))
    ours_s, scored = timed(lambda: score_table(task, loaded, pa.table({"text": texts})))
    ours = np.array(scored.columns["embedding"].to_pylist(), dtype=np.float32)

    agree = float(min((ours * fixed).sum(1).min(), (ours * longest).sum(1).min()))
    n = len(texts)
    print(f"{n} texts, max_length {max_length}, provider {loaded.active}")
    print("| variant | seconds | rows/s | speed-up vs fixed-pad | vs pad-longest |")
    print("|---|---|---|---|---|")
    for name, seconds in (("fixed-pad", fixed_s), ("pad-longest", longest_s), ("ours", ours_s)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} | {fixed_s / seconds:.2f}x | "
              f"{longest_s / seconds:.2f}x |")
    print(f"min cosine between variants: {agree:.6f}")
    return 0 if agree > 0.9999 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Generated tokens per second on one model and one set of prompts, in one run
(``make bench-generate``):

- the pipeline: ``python -m pipeline.run`` on the onnxruntime-genai folder (start-up
  included, the product's defaults: two one-thread CPU workers on this machine);
- onnxruntime-genai's own loop, one prompt at a time, as its ``model-generate`` example runs a
  prompt (all cores);
- the same loop batched, as its examples batch prompts (8 a batch, padded on the right);
- transformers' ``generate`` on PyTorch CPU, 8 a batch padded on the left (in .venv-genai,
  ``benchmarks/generation_baseline.py``).

The model is a Llama of 36M parameters with random weights (8 layers of 512), built by
onnxruntime-genai's model builder (fp32, CPU) in .venv-genai; 128 prompts of 4 to 60 tokens,
greedy, ``max_new_tokens`` 64. Every side counts the tokens it generated (random weights end
some texts early, at their end-of-sequence token, on every side alike), and the pipeline's
tokens are compared with the one-at-a-time loop's, row by row.

    python -m benchmarks.generation [--prompts 128] [--max-new 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from benchmarks.throughput import run_json, timed_job

REPO = Path(__file__).resolve().parents[1]
SIDE = str(REPO / ".venv-genai" / "bin" / "python")
EOS = 2


def genai_loop(folder: Path, prompts: list[list[int]], max_new: int,
               batch: int) -> tuple[float, list[list[int]]]:
    """onnxruntime-genai's generator, ``batch`` prompts at a time padded on the right; the new
    tokens of each prompt, read step by step."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    started = time.perf_counter()
    model = og.Model(config)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        width = max(len(p) for p in part)
        tokens = np.full((len(part), width), EOS, np.int32)
        for i, p in enumerate(part):
            tokens[i, :len(p)] = p
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=len(part), max_length=width + max_new,
                                  do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokens)
        rows: list[list[int]] = [[] for _ in part]
        done = [False] * len(part)
        while not generator.is_done() and not all(done):
            generator.generate_next_token()
            for i, token in enumerate(generator.get_next_tokens()):
                if not done[i]:
                    rows[i].append(int(token))
                    done[i] = int(token) == EOS or len(rows[i]) >= max_new
        out += rows
    return time.perf_counter() - started, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench" / "gen")
    args = parser.parse_args()
    work = args.work
    if not (work / "genai" / "genai_config.json").exists() or \
            pq.read_metadata(work / "prompts.parquet").num_rows != args.prompts:
        subprocess.run([SIDE, "-m", "benchmarks.generation_baseline", "build", "--out",
                        str(work), "--prompts", str(args.prompts)], check=True)
    texts = pq.read_table(work / "prompts.parquet")["prompt"].to_pylist()
    tokenizer = Tokenizer.from_file(str(work / "genai" / "tokenizer.json"))
    prompts = [e.ids for e in tokenizer.encode_batch(texts)]
    results: dict[str, Any] = {}
    print("pipeline ...", file=sys.stderr, flush=True)
    out = work / "out-pipeline"
    job = {"name": "bench-generate", "input": {"uri": str(work / "prompts.parquet")},
           "model": {"uri": str(work / "genai")}, "passthrough": ["id"],
           "task": {"kind": "generate", "max_new_tokens": args.max_new},
           "output": {"uri": str(out), "mode": "overwrite"}}
    seconds, _, _ = timed_job(job, work, "generate")
    table = pq.read_table(out, columns=["id", "generated", "tokens_out"]).sort_by("id")
    results["pipeline"] = {"seconds": seconds, "tokens": int(sum(table["tokens_out"].to_pylist()))}
    print("onnxruntime-genai, one prompt at a time ...", file=sys.stderr, flush=True)
    seconds, alone = genai_loop(work / "genai", prompts, args.max_new, 1)
    results["genai-one"] = {"seconds": seconds, "tokens": sum(map(len, alone))}
    print("onnxruntime-genai, 8 a batch ...", file=sys.stderr, flush=True)
    seconds, batched = genai_loop(work / "genai", prompts, args.max_new, 8)
    results["genai-batch-8"] = {"seconds": seconds, "tokens": sum(map(len, batched))}
    print("transformers generate, 8 a batch ...", file=sys.stderr, flush=True)
    results["transformers"] = run_json([SIDE, "-m", "benchmarks.generation_baseline", "torch",
                                        "--out", str(work), "--max-new", str(args.max_new),
                                        "--threads", str(os.cpu_count() or 1)])
    ours = [tokenizer.decode(ids, skip_special_tokens=True) for ids in alone]
    same = sum(a == b for a, b in zip(table["generated"].to_pylist(), ours, strict=True))
    rate = {k: v["tokens"] / v["seconds"] for k, v in results.items()}
    print(f"\n{os.cpu_count()} CPUs; {len(prompts)} prompts, max_new_tokens {args.max_new}\n")
    print("| side | tokens | seconds | tokens/s | pipeline / side |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens']:,} | {r['seconds']:.1f} | {rate[name]:,.1f} | "
              f"{rate['pipeline'] / rate[name]:.2f}x |")
    print(f"\npipeline texts equal to the one-at-a-time loop's: {same} of {len(prompts)}")
    (work / "results.json").write_text(json.dumps({"results": results, "same": same,
                                                   "cpus": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

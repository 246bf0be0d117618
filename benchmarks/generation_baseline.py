"""The generation benchmark's side of transformers and the model builder (run in .venv-genai,
never in the project's venv): build the model every side runs, and time transformers'
``generate`` on PyTorch.

    .venv-genai/bin/python -m benchmarks.generation_baseline build --out DIR --prompts N
    .venv-genai/bin/python -m benchmarks.generation_baseline torch --out DIR --max-new 64

``build``: a Llama of 36M parameters (8 layers of 512, grouped-query attention with 8 heads
and 4 for keys and values, the conformance case's tokenizer), random weights from a fixed
seed, saved for transformers in ``DIR/hf`` and built by onnxruntime-genai's model builder
(fp32, CPU) into ``DIR/genai``; and ``N`` prompts of 4 to 60 tokens in
``DIR/prompts.parquet``. ``torch``: ``generate(do_sample=False)`` in batches of 8 padded on the
left, timed from the model load; prints a JSON line with the seconds and the tokens each
row generated up to its end-of-sequence token (the padding after it is not counted).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def build(out: Path, prompts: int) -> None:
    import conformance_generate as cases
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(0)
    texts = cases.corpus(random.Random(51), 2000)
    tokenizer = cases.generation_tokenizer(texts)
    tokenizer.model_max_length = 512
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out / "hf")
    tokenizer.save_pretrained(out / "hf")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                    str(out / "hf"), "-o", str(out / "genai"), "-p", "fp32", "-e", "cpu",
                    "-c", str(out / "cache")], check=True, capture_output=True)
    shutil.rmtree(out / "cache", ignore_errors=True)
    rng = random.Random(3)
    rows = [" ".join(rng.sample(texts, rng.randint(1, 6))) for _ in range(prompts)]
    pq.write_table(pa.table({"id": list(range(prompts)), "prompt": rows}),
                   out / "prompts.parquet")


def run_torch(out: Path, max_new: int, batch: int, threads: int) -> None:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(threads)
    prompts = pq.read_table(out / "prompts.parquet")["prompt"].to_pylist()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(out / "hf", padding_side="left")
    model = LlamaForCausalLM.from_pretrained(out / "hf").eval()
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            enc = tokenizer(prompts[start:start + batch], padding=True, return_tensors="pt")
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():  # up to its eos, counted
                ends = [i for i, t in enumerate(row) if t == tokenizer.eos_token_id]
                tokens += ends[0] + 1 if ends else len(row)
    print(json.dumps({"seconds": time.perf_counter() - started, "tokens": tokens,
                      "rows": len(prompts)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["build", "torch"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.step == "build":
        build(args.out, args.prompts)
    else:
        run_torch(args.out, args.max_new, args.batch, args.threads)


if __name__ == "__main__":
    main()

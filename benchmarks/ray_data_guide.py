"""Ray Data batch inference as its guide shows it: read_parquet -> map_batches(actor) -> write.

    python -m benchmarks.ray_data_guide --input DIR --output DIR --model models/minilm

A callable class loads the tokenizer and an ONNX Runtime session once per actor; each batch is
tokenized with padding to its longest row (input order, as a Hugging Face tokenizer called with
padding=True does) and run. One 1-CPU actor per core, one intra-op thread each, and the same
batch size as the pipeline's CPU default, so the comparison is of the whole design, not of a
mis-set knob. Prints one JSON line: rows, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


class EmbedBatch:
    def __init__(self, model_dir: str) -> None:
        import onnxruntime as ort

        from pipeline.models.bundle import fetch_bundle
        from pipeline.tasks.text import load_tokenizer

        bundle = fetch_bundle(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle.model_path), opts,
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(str(bundle.tokenizer_path), bundle.spec.text.max_length)
        self.tokenizer.enable_padding()  # to the longest row of each batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(batch["text"]))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        vectors = self.session.run(None, feeds)[0]
        return {"id": batch["id"], "embedding": list(vectors)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="models/minilm")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    started = time.perf_counter()
    # One logical CPU more than the actors take, for the read and write tasks: actors that
    # reserve every CPU leave none for them and the dataset stalls.
    ray.init(address="local", num_cpus=args.actors + 1, include_dashboard=False,
             log_to_driver=False)
    ds = ray.data.read_parquet(os.path.abspath(args.input), columns=["id", "text"])
    ds = ds.map_batches(EmbedBatch, fn_constructor_args=(os.path.abspath(args.model),),
                        concurrency=args.actors, num_cpus=1, batch_size=args.batch_size,
                        batch_format="numpy")
    ds.write_parquet(os.path.abspath(args.output))
    seconds = time.perf_counter() - started
    rows = ray.data.read_parquet(os.path.abspath(args.output)).count()
    ray.shutdown()
    print(json.dumps({"rows": rows, "seconds": round(seconds, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

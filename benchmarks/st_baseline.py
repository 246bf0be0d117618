"""sentence-transformers on PyTorch (CPU), run in its own environment (make bench-st-env).

    .venv-st/bin/python benchmarks/st_baseline.py --texts texts.json --model DIR --threads N

``model.encode`` sorts texts by length itself, so this is the strongest plain-PyTorch baseline.
Reads a JSON list of texts (the side environment has no pyarrow); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", required=True)
    parser.add_argument("--model", required=True, help="a sentence-transformers folder")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vectors", help="write the embeddings here (.npy) for a parity check")
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.texts) as fh:
        texts = json.load(fh)
    model = SentenceTransformer(args.model, device="cpu")
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    if args.vectors:
        np.save(args.vectors, np.asarray(vectors, dtype=np.float32))
    with open("/proc/self/status") as fh:  # VmHWM: this process's own peak, not its parent's
        peak = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"rows": len(texts), "seconds": round(seconds, 3), "peak_rss_mb": peak,
                      "torch": torch.__version__, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

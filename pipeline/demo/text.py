"""Demo text: English sentences and paragraphs from the docstrings of Python's standard library.

Read with ``ast`` from the source files (nothing is imported or downloaded), so the data set
is real prose of varied length that exists on every machine with Python.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo"}


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *[n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]]
    return [d for n in nodes if (d := ast.get_docstring(n))]


@functools.lru_cache(maxsize=1)
def stdlib_passages() -> list[tuple[str, str]]:
    """(module, passage) pairs: paragraphs and sentences, whitespace normalized."""
    root = Path(sysconfig.get_paths()["stdlib"])
    passages: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for doc in _docstrings(path):
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                if len(text.split()) >= 3 and sum(c.isalpha() for c in text) > len(text) / 2:
                    passages.append((module, text))
    return passages


def make_text_table(rows: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    passages = stdlib_passages()
    ids, texts, sources = [], [], []
    for i in range(rows):
        module, text = passages[rng.randrange(len(passages))]
        shape = rng.random()
        if shape < 0.35:  # one sentence
            sentences = re.split(r"(?<=[.!?])\s+", text)
            text = rng.choice(sentences)
        elif shape > 0.9:  # a long document: several passages
            text = " ".join([text, *(p for _, p in rng.sample(passages, rng.randint(2, 8)))])
        ids.append(i)
        texts.append(text)
        sources.append(module)
    return pa.table({"id": pa.array(ids, pa.int64()), "text": texts, "source": sources})


def write_text_data(out: Path, rows: int, files: int = 4, row_group_size: int = 1000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = make_text_table(rows)
    per_file = -(-rows // files) if rows else 0
    for i in range(files):
        part = table.slice(i * per_file, per_file)
        pq.write_table(part, out / f"docs-{i:03d}.parquet", row_group_size=row_group_size)

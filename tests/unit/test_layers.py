"""The package's layers hold: no module imports a module of a layer above its own, our own
modules are imported at the top of a file (never inside a function), there are no import
cycles, and the pure modules load neither Ray nor onnxruntime nor the worker or the runner.

docs/architecture.md ("Modules and layers") explains the layers; a new module must be placed
in one here, or this test fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: dict[str, list[str]] = {
    "base": ["errors", "arrow_types", "redaction", "metadata", "storage", "faults", "cli_common", "health",
             "scheduler", "metrics", "progress"],
    "descriptions": ["spec", "job_file", "locality", "providers", "genai_sessions", "sessions",
                     "models.identity",
                     "models.bundle", "models.onnx_types", "models.onnx_graph",
                     "models.graph_rewrites"],
    "model tools": ["models.validate", "models.shipping", "models.info", "models.optimize",
                    "models.bert_export", "models.sources", "models.image_processor",
                    "models.detection", "models.detr", "models.interpret", "models.repairs",
                    "models.sparse_pooling", "models.checks", "models.decoding",
                    "models.generation", "models.constrained", "models.genai_loop",
                    "models.importing"],
    "data": ["formats", "listing", "plan", "increment", "pools", "state", "outcome", "layout",
             "output", "runs", "commit", "dead_letters", "batch_formats", "sinks",
             "sinks.base", "sinks.object_store", "sinks.parquet_sink", "sinks.delta_sink",
             "sinks.iceberg_sink", "sinks.merge_sink", "sinks.lance_sink", "sinks.lance_index", "lease",
             "lease_stores", "isolation",
             "sources.base", "sources.filters", "sources.files", "sources.delta",
             "sources.lance_source", "sources.iceberg", "sources.tables", "sources",
             "shard_rows"],
    "compute": ["tasks", "tasks.base", "tasks.text", "tasks.embed", "tasks.classify",
                "tasks.tensor", "tasks.images", "tasks.rerank", "tasks.entities",
                "tasks.token_classify", "tasks.zero_shot", "tasks.zero_shot_image",
                "tasks.sparse_embed", "tasks.chunking",
                "tasks.letterbox", "tasks.detections", "tasks.detect", "tasks.generate",
                "tasks.chat",
                "inference", "scoring",
                "ray_context", "worker"],
    "driver": ["actor_pool", "ray_backend", "runner", "report", "planning", "job"],
    "entry points": ["", "api", "predictor", "run", "submit", "accuracy_gate", "import_checks",
                     "models",
                     "models.__main__", "demo", "demo.__main__", "demo.text", "demo.tabular",
                     "demo.images", "demo.tables", "demo.prompts"],
}
LAYER_OF = {f"pipeline.{m}" if m else "pipeline": i
            for i, (_, mods) in enumerate(LAYERS.items()) for m in mods}
PURE = ["spec", "job_file", "plan", "isolation", "lease", "scheduler", "pools", "increment",
        "listing", "health", "state", "outcome", "actor_pool", "report", "runs", "layout",
        "output", "formats", "errors", "arrow_types"]
FORBIDDEN_IN_PURE = ("ray", "onnxruntime", "pipeline.worker", "pipeline.runner")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(module imported, at function level, line) for every import of ``pipeline`` modules."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "pipeline":  # from pipeline import storage
                    found.extend((f"pipeline.{a.name}", in_function, child.lineno)
                                 for a in child.names)
                else:
                    found.append((child.module, in_function, child.lineno))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return [(m, late, line) for m, late, line in found
            if m == "pipeline" or m.startswith("pipeline.")]


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(MODULES)) == []  # no stale entry either


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_or_sideways_only(module):
    layers = list(LAYERS)
    upward = [f"line {line}: {target} ({layers[LAYER_OF[target]]})"
              for target, _, line in imports(MODULES[module])
              if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[module]]
    assert upward == [], f"{module} ({layers[LAYER_OF[module]]}) imports a layer above it"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_our_modules_are_imported_at_the_top(module):
    # Under `ray job submit` the working directory can vanish once the driver connected: a
    # late import of our own code would then fail half way through a job.
    late = [f"line {line}: {target}" for target, in_function, line in imports(MODULES[module])
            if in_function]
    assert late == []


def test_no_import_cycles():
    graph = {m: {t for t, late, _ in imports(p) if not late and t in MODULES and t != m}
             for m, p in MODULES.items()}
    for module in graph:  # every package imports its parent package first: not a cycle
        graph[module] -= {p for p in graph if module.startswith(p + ".") or p == "pipeline"}
    state: dict[str, int] = {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                walk(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_load_no_runtime(module):
    code = (f"import sys, pipeline.{module}\n"
            f"print([m for m in {FORBIDDEN_IN_PURE!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", f"pipeline.{module} loads {out.stdout.strip()}"

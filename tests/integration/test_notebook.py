"""notebooks/quickstart.ipynb runs on a real kernel, on the session's Ray cluster."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = pytest.mark.usefixtures("ray_cluster")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
ROWS = 200  # the notebook's default is 300; fewer keep `make test` quick
# Run before the closing ray.shutdown(): which Python and which Ray cluster the kernel used.
PROBE = """
import sys, ray
print("PROBE", sys.prefix, ray.get_runtime_context().gcs_address if ray.is_initialized() else None)
"""


def execute(nb: nbformat.NotebookNode, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run every cell on a real ipykernel started from NOTEBOOK's folder, as Jupyter would.

    The kernel spec's "python" means this interpreter (jupyter_client swaps in sys.executable),
    so the kernel runs in this virtualenv. A failing cell raises CellExecutionError.
    """
    client = NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env={**os.environ, **env})
    return nb


def ray_env() -> dict[str, str]:
    """Point the kernel at the session's cluster, so it does not start a second one."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}


def texts(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def cell_with(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code" and source in c.source)


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[nbformat.NotebookNode, Path]:
    out = tmp_path_factory.mktemp("notebook")
    before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.cells[-1].source == "ray.shutdown()"
    nb.cells.insert(len(nb.cells) - 1, new_code_cell(PROBE))
    execute(nb, {**ray_env(), "QUICKSTART_OUT": str(out), "QUICKSTART_ROWS": str(ROWS)})
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == before  # nothing left in the repo
    return nb, out


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_runs_without_errors_in_this_venv_on_the_session_cluster(executed):
    nb, _ = executed
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert errors == []
    probe = texts(nb.cells[-2]).split()
    assert probe[:2] == ["PROBE", sys.prefix]
    assert probe[2] == ray_env()["RAY_ADDRESS"]


def test_rerun_resumes_every_shard(executed):
    nb, out = executed
    report = json.loads((out / "embed" / "_pipeline" / "report.json").read_text())
    shards = report["totals"]["shards"]
    assert shards == ROWS // 50
    text = texts(cell_with(nb, "again = pipeline.run_job"))
    assert f"resumed {shards} of {shards} shards, ran 0 now" in text


def test_report_is_plotted(executed):
    nb, _ = executed
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images


def test_result_is_read_back(executed):
    nb, _ = executed
    assert f"{ROWS} rows, columns ['id', 'source', 'embedding']" in texts(cell_with(nb, "result.read()"))
    assert "50 rows scored by OnnxPredictor, 50 without error" in texts(
        cell_with(nb, "OnnxPredictor,"))


def test_a_failing_cell_fails_the_run(tmp_path):
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("raise ValueError('boom')"),
                             new_code_cell("print('not reached')")])
    with pytest.raises(CellExecutionError, match="boom"):
        execute(nb, {})
    assert "not reached" not in texts(nb.cells[2])

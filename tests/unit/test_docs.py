"""The docs stay true: every command in README.md and docs/ runs as written (its make target
exists, the CLI accepts its flags, its job files exist and validate with its --set keys), and
every relative link points to a file and heading that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pipeline import run as run_cli
from pipeline import submit
from pipeline.job_file import read_job, validate_job
from pipeline.models import __main__ as models_cli

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {"pipeline.run": run_cli._parser, "pipeline.submit": submit._parser,
           "pipeline.models": models_cli._parser}


def shell_lines(path: Path) -> list[str]:
    """Command lines of the file's bash blocks: continuations joined, comments dropped."""
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = [(path.name, line) for path in DOCS for line in shell_lines(path)]
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


def pipeline_call(line: str) -> tuple[str, list[str]] | None:
    """(module, arguments) of a ``python -m pipeline.X`` call in ``line``; optional parts in
    [brackets] left out, and the first of a|b|c alternatives taken."""
    line = re.sub(r"\[[^\]]*\]", " ", line)
    match = re.search(r"python -m (pipeline\.\w+)\s*(.*)$", line)
    if not match:
        return None
    words = [w.split("|")[0] if "|" in w and "://" not in w else w
             for w in shlex.split(match.group(2))]
    return match.group(1), words


def test_the_docs_have_commands_to_check():
    assert len([c for c in COMMANDS if pipeline_call(c[1])]) >= 10
    assert len([c for c in COMMANDS if c[1].startswith("make ")]) >= 5


@pytest.mark.parametrize("doc,line", [c for c in COMMANDS if c[1].startswith("make ")])
def test_make_targets_exist(doc, line):
    targets = [w for w in line.split()[1:] if not w.startswith("-")]
    assert targets and set(targets) <= MAKE_TARGETS, f"{doc}: {line}"


@pytest.mark.parametrize("doc,line", [c for c in COMMANDS if pipeline_call(c[1])])
def test_cli_calls_parse_and_their_job_files_validate(doc, line, monkeypatch):
    module, words = pipeline_call(line)
    args = PARSERS[module]().parse_args(words)  # exits (fails the test) on an unknown flag
    jobs = [j for j in getattr(args, "job", []) if j.endswith(".yaml")]
    if not jobs or not all((REPO / j).exists() for j in jobs):
        assert all(not j.startswith(("jobs/", "configs/")) for j in jobs), f"{doc}: {line}"
        return
    monkeypatch.chdir(REPO)
    data, where = read_job(jobs[0] if len(jobs) == 1 else jobs, args.overrides)
    validate_job(data, where, env="keep")  # the --set keys are real job keys


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


LINKS = [(path, target) for path in [*DOCS, REPO / "benchmarks" / "RESULTS.md"]
         for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
         if "://" not in target and not target.startswith("mailto:")]


@pytest.mark.parametrize("path,target", LINKS, ids=[f"{p.name}->{t}" for p, t in LINKS])
def test_relative_links_resolve(path, target):
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    assert resolved.exists(), f"{path.name}: {target}"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), f"{path.name}: {target}"

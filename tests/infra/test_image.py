"""The cluster image (infra/Dockerfile) against the project, checked statically (no Docker engine).

Each rule is a function of the Dockerfile text (and of pyproject.toml, the installed wheels'
metadata or versions where it compares against them) that raises ``ImageMismatch`` with a message
saying what is wrong and how to fix it. The real files must pass every rule; each rule is also fed
a bad Dockerfile to show that it can fail.

What this cannot prove: that the base tag exists in the registry, that the build succeeds, or that
the CUDA provider loads (only on a GPU host: benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"
ORT_GPU = "onnxruntime-gpu"


class ImageMismatch(Exception):
    """The Dockerfile disagrees with the project or the rules for cluster images."""


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, heredoc bodies appended after a newline
    line: int  # 1-based line of the keyword


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with comments dropped, continuation lines joined and RUN heredocs kept."""
    lines = text.splitlines()
    out: list[Instruction] = []
    i = 0
    while i < len(lines):
        start = i
        stripped = lines[i].strip()
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        parts = [stripped]
        continued = stripped.endswith("\\")
        while continued and i < len(lines):
            parts[-1] = parts[-1].removesuffix("\\").rstrip()
            nxt = lines[i].strip()
            i += 1
            if nxt and not nxt.startswith("#"):  # comment and empty lines inside a continuation are dropped
                parts.append(nxt)
                continued = nxt.endswith("\\")
        parts[-1] = parts[-1].removesuffix("\\").rstrip()
        logical = " ".join(p for p in parts if p)
        keyword, _, args = logical.partition(" ")
        heredocs = re.findall(r"<<-?[\"']?([A-Za-z_]\w*)[\"']?", args)
        for delimiter in heredocs if keyword.upper() in ("RUN", "COPY") else []:
            body = []
            while i < len(lines) and lines[i].strip() != delimiter:
                body.append(lines[i])
                i += 1
            i += 1
            args += "\n" + "\n".join(body)
        out.append(Instruction(keyword.upper(), args.strip(), start + 1))
    return out


def _expand(value: str, variables: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        if name in variables:
            return variables[name]
        if default is not None:
            return default
        raise ImageMismatch(f"${name} is used in {value!r} but has no ARG default")

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", repl, value)


def final_stage(text: str) -> tuple[str, list[Instruction]]:
    """The base image of the last stage (ARG defaults substituted) and that stage's instructions."""
    global_args: dict[str, str] = {}
    base, stage = None, []
    for ins in parse_dockerfile(text):
        if ins.keyword == "ARG" and base is None:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip("\"'")
        elif ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base, stage = _expand(words[0], global_args), []
        elif base is not None:
            stage.append(ins)
    if base is None:
        raise ImageMismatch("the Dockerfile has no FROM line")
    return base, stage


# ------------------------------------------------------------------------------ base image tag


@dataclass(frozen=True)
class RayBase:
    image: str
    ray: str  # "2.60.0"
    python: tuple[int, int]  # (3, 11)
    cuda_major: int | None  # None: a CPU image


RAY_TAG = re.compile(
    r"(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<pyminor>\d+)(?:-(?P<platform>cpu|gpu|cu\d+))?(?:-aarch64)?")


def ray_base(dockerfile: str) -> RayBase:
    """The final stage's base, which must be a rayproject/ray image with a full, explicit tag."""
    image, _ = final_stage(dockerfile)
    repo, _, tag = image.rpartition(":")
    if repo not in ("rayproject/ray", "docker.io/rayproject/ray"):
        raise ImageMismatch(
            f"base image {image!r}: expected rayproject/ray:<ray version>-py<XY>-<cpu|cuXYZ>, the image "
            "whose Ray and Python this test can compare with the project")
    match = RAY_TAG.fullmatch(tag)
    if not match:
        raise ImageMismatch(
            f"base image {image!r}: the tag must name the Ray release and the Python version, "
            "e.g. rayproject/ray:2.60.0-py311-cpu (not latest, nightly or a tag without -pyXY)")
    platform = match["platform"] or "cpu"  # no suffix is an alias of -cpu for rayproject/ray
    if platform == "gpu":
        raise ImageMismatch(f"base image {image!r}: -gpu is an alias whose CUDA version changes between "
                            "releases; name it (-cuXYZ) or use -cpu with the project's cuda extra")
    # Ray's tags write CUDA X.Y as cuXY (cu118, cu121, cu128, cu130): the last digit is the minor.
    cuda_major = None if platform == "cpu" else int(platform[2:-1])
    return RayBase(image, match["ray"], (int(match["py"]), int(match["pyminor"])), cuda_major)


# -------------------------------------------------------------------------- wheel requirements


def _lower_bound_major(req: Requirement) -> int:
    """Major version a requirement pins (~=13.0, ==13.*, >=13,<14); it must name exactly one."""
    majors = {Version(s.version.rstrip(".*")).major for s in req.specifier
              if s.operator in ("~=", "==", "===", ">=", ">")}
    if len(majors) != 1:
        raise ImageMismatch(f"cannot tell one major version from the wheel requirement {str(req)!r}")
    return majors.pop()


def _extras_of(req: Requirement) -> set[str]:
    """The extras under which a wheel requirement applies (from its `extra == "..."` markers)."""
    return set(re.findall(r"""extra\s*==\s*["']([^"']+)["']""", str(req.marker or "")))


@dataclass(frozen=True)
class WheelNeeds:
    cuda_major: int
    cuda_extras: set[str]  # extras of onnxruntime-gpu that bring the CUDA runtime
    cudnn_major: int
    cudnn_extras: set[str]


def wheel_needs(requires: list[str]) -> WheelNeeds:
    """CUDA and cuDNN majors from onnxruntime-gpu's requirements, e.g. `nvidia-cuda-runtime~=13.0`
    (CUDA 13 packages drop the suffix) or `nvidia-cuda-runtime-cu12` (CUDA 12 style), and
    `nvidia-cudnn-cu13~=9.0` (cuDNN 9 for CUDA 13)."""
    cuda = cudnn = None
    for text in requires:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        suffix = re.fullmatch(r"nvidia-cuda-runtime(?:-cu(\d+))?", name)
        if suffix:
            major = int(suffix[1]) if suffix[1] else _lower_bound_major(req)
            cuda = (major, _extras_of(req))
        suffix = re.fullmatch(r"nvidia-cudnn-cu(\d+)", name)
        if suffix:
            cudnn = (_lower_bound_major(req), _extras_of(req), int(suffix[1]))
    if cuda is None or cudnn is None:
        raise ImageMismatch(
            f"{ORT_GPU}'s metadata names no {'CUDA runtime' if cuda is None else 'cuDNN'} wheel: cannot tell "
            f"which CUDA it needs. Requirements: {requires}")
    if cudnn[2] != cuda[0]:
        raise ImageMismatch(f"{ORT_GPU} asks for cuDNN built for CUDA {cudnn[2]} but CUDA runtime {cuda[0]}")
    return WheelNeeds(cuda[0], cuda[1], cudnn[0], cudnn[1])


# ------------------------------------------------------------------------------ pip installs


def _commands(shell: str) -> list[list[str]]:
    """Simple commands of a RUN line: words split at &&, ||, ;, | and newlines."""
    lexer = shlex.shlex(shell.replace("\n", " ; "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&|;(){}"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


_PIP_OPTIONS_WITH_VALUE = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f",
                           "--find-links", "--target", "-t", "--prefix", "--root", "--platform",
                           "--python-version", "--upgrade-strategy", "--progress-bar", "--cache-dir"}


@dataclass(frozen=True)
class PipInstall:
    line: int
    targets: list[str]  # package arguments: ".[cuda]", "numpy==2", ...
    requirement_files: list[str]  # -r FILE


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for words in _commands(ins.args):
            for k in range(len(words) - 1):
                is_pip = re.fullmatch(r"(.*/)?pip(3(\.\d+)?)?", words[k]) is not None
                if is_pip and words[k + 1] == "install":
                    found.append(_pip_args(ins.line, words[k + 2:]))
                    break
    return found


def _pip_args(line: int, args: list[str]) -> PipInstall:
    targets, files, k = [], [], 0
    while k < len(args):
        arg = args[k]
        if arg in ("-r", "--requirement"):
            files.append(args[k + 1] if k + 1 < len(args) else "")
            k += 2
            continue
        if arg in _PIP_OPTIONS_WITH_VALUE:
            k += 2
            continue
        if arg in ("-e", "--editable"):
            k += 1
            continue
        if not arg.startswith("-"):
            targets.append(arg)
        k += 1
    return PipInstall(line, targets, files)


PROJECT_TARGET = re.compile(r"\.(?:/)?(?:\[(?P<extras>[\w,\s-]*)\])?")


def project_extras(dockerfile: str) -> set[str]:
    """Extras of the project install (`pip install ".[a,b]"`) in the final stage."""
    _, stage = final_stage(dockerfile)
    extras: set[str] = set()
    for install in pip_installs(stage):
        for target in install.targets:
            match = PROJECT_TARGET.fullmatch(target)
            if match and match["extras"]:
                extras |= {e.strip() for e in match["extras"].split(",") if e.strip()}
    return extras


# ------------------------------------------------------------------------------------ the rules


def check_cuda(dockerfile: str, requires: list[str], pyproject: dict) -> None:
    """The image's CUDA major is the one the installed onnxruntime-gpu wheel is built for."""
    base, needs = ray_base(dockerfile), wheel_needs(requires)
    if base.cuda_major is not None:
        if base.cuda_major != needs.cuda_major:
            raise ImageMismatch(
                f"base image {base.image} carries CUDA {base.cuda_major} but the installed {ORT_GPU} "
                f"needs CUDA {needs.cuda_major}: onnxruntime would silently run on the CPU. Use a "
                f"-cu{needs.cuda_major}X tag, or the -cpu tag with `pip install \".[cuda]\"` (the CUDA "
                "runtime and cuDNN from pip)")
        return
    _check_cuda_extra(dockerfile, pyproject, needs.cuda_extras, f"CUDA {needs.cuda_major} runtime",
                      f"base image {base.image} has no CUDA")


def check_cudnn(dockerfile: str, requires: list[str], pyproject: dict) -> None:
    """cuDNN of the wheel's major comes into the image from the wheel's own `cudnn` extra.

    A CUDA base tag does not say which cuDNN it carries, so on any base the project's `cuda`
    extra must bring the cuDNN that onnxruntime-gpu's metadata names."""
    base, needs = ray_base(dockerfile), wheel_needs(requires)
    why = (f"base image {base.image} has no CUDA" if base.cuda_major is None
           else f"base image {base.image} does not say which cuDNN it carries")
    _check_cuda_extra(dockerfile, pyproject, needs.cudnn_extras, f"cuDNN {needs.cudnn_major}", why)


def _check_cuda_extra(dockerfile: str, pyproject: dict, ort_extras: set[str], what: str, why: str) -> None:
    if "cuda" not in project_extras(dockerfile):
        raise ImageMismatch(
            f"the image gets no {what} from pip: {why}, and the Dockerfile does not install the "
            "project's `cuda` extra; use `pip install --no-cache-dir \".[cuda]\"`")
    wanted = [Requirement(r) for r in pyproject["project"].get("optional-dependencies", {}).get("cuda", [])]
    gpu_reqs = [r for r in wanted if canonicalize_name(r.name) == ORT_GPU]
    if not gpu_reqs or not ort_extras <= gpu_reqs[0].extras:
        raise ImageMismatch(
            f"pyproject.toml's `cuda` extra must ask for {ORT_GPU}[{','.join(sorted(ort_extras))}] to get "
            f"the {what} from pip; it asks for {[str(r) for r in wanted]}")


def check_ray(dockerfile: str, pyproject: dict, installed_ray: str) -> None:
    """The tag's Ray satisfies pyproject's ray requirement and equals the Ray of this environment."""
    base = ray_base(dockerfile)
    ray_reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]
                if canonicalize_name(Requirement(r).name) == "ray"]
    if not ray_reqs:
        raise ImageMismatch("pyproject.toml does not depend on ray")
    for req in ray_reqs:
        if not req.specifier.contains(base.ray, prereleases=True):
            raise ImageMismatch(f"base image {base.image} has Ray {base.ray}, outside pyproject's {req}")
    local = ".".join(str(n) for n in Version(installed_ray).release[:3])
    if base.ray != local:
        raise ImageMismatch(
            f"base image {base.image} has Ray {base.ray} but this environment has Ray {local}: the "
            "driver and the cluster must run the same Ray. Change RAY_VERSION in infra/Dockerfile "
            "or the environment's Ray")


def check_python(dockerfile: str, pyproject: dict, local: tuple[int, int]) -> None:
    """The tag's pyXY satisfies requires-python and is this interpreter's major.minor."""
    base = ray_base(dockerfile)
    version = "{}.{}".format(*base.python)
    requires = SpecifierSet(pyproject["project"].get("requires-python", ""))
    if not requires.contains(version):
        raise ImageMismatch(
            f"base image {base.image} has Python {version}, outside requires-python {requires}")
    if base.python != tuple(local):
        raise ImageMismatch(
            f"base image {base.image} has Python {version} but this environment runs Python "
            "{}.{}: Ray needs the same Python on the driver and the cluster".format(*local))


def check_installs_project(dockerfile: str, pyproject: dict) -> None:
    """The project itself is installed from pyproject.toml, after copying it and the package;
    nothing else is pip-installed, so the image cannot drift from pyproject.toml."""
    _, stage = final_stage(dockerfile)
    copied: dict[str, int] = {}
    for ins in stage:
        if ins.keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            for source in words[:-1]:
                copied.setdefault(source.rstrip("/").removeprefix("./"), ins.line)
    installs = pip_installs(stage)
    project = [i for i in installs if any(PROJECT_TARGET.fullmatch(t) for t in i.targets)]
    if not project:
        raise ImageMismatch("the Dockerfile does not install the project: add "
                            "`RUN pip install --no-cache-dir \".[cuda]\"` after copying pyproject.toml")
    for install in installs:
        others = [t for t in install.targets if not PROJECT_TARGET.fullmatch(t)]
        if others or install.requirement_files:
            raise ImageMismatch(
                f"line {install.line}: pip installs {others + install.requirement_files} besides the "
                "project; declare dependencies in pyproject.toml so image and project cannot drift apart")
    line = project[0].line
    for needed in ("pyproject.toml", "pipeline"):
        if copied.get(needed, line) >= line:
            raise ImageMismatch(f"COPY {needed} must come before the project install (line {line})")
    declared = set(pyproject["project"].get("optional-dependencies", {}))
    unknown = project_extras(dockerfile) - declared
    if unknown:
        raise ImageMismatch(f"the Dockerfile asks for extras {sorted(unknown)} that pyproject.toml does "
                            f"not declare ({sorted(declared)})")


def check_provider_assertion(dockerfile: str) -> None:
    """The build fails unless onnxruntime lists the CUDA provider (after installing it)."""
    _, stage = final_stage(dockerfile)
    installs = pip_installs(stage)
    last_install = max((i.line for i in installs), default=0)
    for ins in stage:
        if (ins.keyword == "RUN" and ins.line >= last_install and "get_available_providers" in ins.args
                and "CUDAExecutionProvider" in ins.args and "assert" in ins.args):
            return
    raise ImageMismatch("no RUN after the pip install asserts that 'CUDAExecutionProvider' is in "
                        "onnxruntime.get_available_providers(): a CPU-only onnxruntime would pass the build")


def final_user(dockerfile: str) -> str | None:
    _, stage = final_stage(dockerfile)
    users = [ins.args.split()[0] for ins in stage if ins.keyword == "USER"]
    return users[-1] if users else None


def check_non_root(dockerfile: str) -> None:
    """The image runs as a named non-root user, set in the Dockerfile itself."""
    user = final_user(dockerfile)
    if user is None:
        raise ImageMismatch("the Dockerfile sets no USER: say which non-root user the image runs as "
                            "(USER ray for rayproject/ray)")
    name = user.split(":")[0]
    if name in ("root", "0"):
        raise ImageMismatch(f"the image runs as {user!r}: end with a non-root USER (e.g. `USER ray`)")


def environment(dockerfile: str) -> dict[str, str]:
    _, stage = final_stage(dockerfile)
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword != "ENV":
            continue
        words = shlex.split(ins.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
        else:
            env.update(w.split("=", 1) for w in words)
    return env


def check_cache_dir(dockerfile: str) -> None:
    """PIPELINE_CACHE_DIR is an absolute path the image's user can write: under /tmp, or created
    by a RUN of that user (after the last USER line)."""
    cache = environment(dockerfile).get("PIPELINE_CACHE_DIR")
    if not cache:
        raise ImageMismatch("ENV PIPELINE_CACHE_DIR is not set: bundles would be cached under $HOME/.cache")
    if not cache.startswith("/"):
        raise ImageMismatch(f"PIPELINE_CACHE_DIR={cache!r} must be an absolute path")
    if cache.startswith("/tmp/"):
        return
    _, stage = final_stage(dockerfile)
    user_lines = [ins.line for ins in stage if ins.keyword == "USER"]
    after = user_lines[-1] if user_lines else 0
    for ins in stage:
        if ins.keyword == "RUN" and ins.line > after and "mkdir" in ins.args and (
                cache in ins.args or "PIPELINE_CACHE_DIR" in ins.args):
            return
    raise ImageMismatch(f"PIPELINE_CACHE_DIR={cache} is not created by the image's user: add "
                        "`RUN mkdir -p \"$PIPELINE_CACHE_DIR\"` after the last USER line")


def check_copies_jobs_and_configs(dockerfile: str) -> None:
    _, stage = final_stage(dockerfile)
    sources = {w.rstrip("/").removeprefix("./") for ins in stage if ins.keyword in ("COPY", "ADD")
               for w in shlex.split(ins.args)[:-1] if not w.startswith("--")}
    missing = {"jobs", "configs"} - sources
    if missing:
        raise ImageMismatch(f"the image does not copy {sorted(missing)}: `python -m pipeline.run jobs/...` "
                            "needs them in its working directory")


def intended_image(dockerfile: str) -> str:
    """The image name the Dockerfile's documented build command tags (`docker build ... -t NAME`)."""
    match = re.search(r"^#\s*docker build\b.*?\s-t\s+(\S+)", dockerfile, re.MULTILINE)
    if not match:
        raise ImageMismatch("the Dockerfile's header has no `docker build ... -t <image>` command")
    return match[1]


# --------------------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


@pytest.fixture(scope="module")
def ort_requires() -> list[str]:
    try:
        return importlib.metadata.requires(ORT_GPU) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{ORT_GPU} is not installed here (not Linux x86_64): nothing to compare the image with")


def test_cuda_major_matches_the_onnxruntime_wheel(dockerfile, pyproject, ort_requires):
    check_cuda(dockerfile, ort_requires, pyproject)


def test_cudnn_major_matches_the_onnxruntime_wheel(dockerfile, pyproject, ort_requires):
    check_cudnn(dockerfile, ort_requires, pyproject)


def test_wheel_metadata_agrees_with_its_build(ort_requires):
    """The CUDA major read from the metadata is the one the installed binaries were built for."""
    from onnxruntime.capi import build_and_package_info as info

    assert wheel_needs(ort_requires).cuda_major == int(info.cuda_version.split(".")[0])


def test_ray_version_matches(dockerfile, pyproject):
    check_ray(dockerfile, pyproject, importlib.metadata.version("ray"))


def test_python_version_matches(dockerfile, pyproject):
    check_python(dockerfile, pyproject, sys.version_info[:2])


def test_installs_the_project_from_pyproject(dockerfile, pyproject):
    check_installs_project(dockerfile, pyproject)
    assert "cuda" in project_extras(dockerfile)


def test_build_asserts_the_cuda_provider_is_listed(dockerfile):
    check_provider_assertion(dockerfile)


def test_runs_as_non_root_with_a_writable_cache(dockerfile):
    check_non_root(dockerfile)
    check_cache_dir(dockerfile)
    check_copies_jobs_and_configs(dockerfile)


def test_dockerignore_keeps_the_context_small_but_complete(dockerfile):
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for heavy in (".venv", "models", "data", "out", ".git", ".pytest_cache", ".ruff_cache"):
        assert heavy in patterns, f".dockerignore must exclude {heavy}"
    _, stage = final_stage(dockerfile)
    for ins in stage:
        if ins.keyword in ("COPY", "ADD"):
            for source in [w for w in shlex.split(ins.args) if not w.startswith("--")][:-1]:
                source = source.rstrip("/").removeprefix("./")
                parts = source.split("/")
                prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
                hit = [p for p in patterns if not p.startswith("!")
                       and any(fnmatch.fnmatch(prefix, p.rstrip("/")) for prefix in prefixes)]
                assert not hit, f"line {ins.line} copies {source}, which .dockerignore excludes ({hit})"
                assert (REPO / source).exists(), f"line {ins.line} copies {source}, which does not exist"


# ------------------------------------------------------------------- each rule can fail

CUDA13_REQUIRES = [
    "numpy>=1.21.6",
    'nvidia-cuda-runtime~=13.0; extra == "cuda"',
    'nvidia-cufft~=12.0; extra == "cuda"',
    'nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
]
CUDA12_REQUIRES = [
    'nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"',
    'nvidia-cudnn-cu12~=9.0; extra == "cudnn"',
]
PYPROJECT_OK = {"project": {
    "requires-python": ">=3.10",
    "dependencies": ["ray[default]>=2.40", "onnxruntime-gpu>=1.20; sys_platform == 'linux'"],
    "optional-dependencies": {"cuda": ["onnxruntime-gpu[cuda,cudnn]>=1.20"], "dev": ["pytest"]},
}}
OLD_CU128 = """\
FROM rayproject/ray:2.60.0-py311-cu128
WORKDIR /opt/pipeline
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
RUN pip install --no-cache-dir . \\
    && python -c "import onnxruntime as ort; print(ort.get_available_providers())"
ENV PIPELINE_CACHE_DIR=/tmp/onnx-pipeline-cache
"""
GOOD = """\
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cpu
USER ray
ENV PIPELINE_CACHE_DIR=/home/ray/.cache/onnx-pipeline
RUN mkdir -p "$PIPELINE_CACHE_DIR"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline ./pipeline
RUN pip install --no-cache-dir \\
    ".[cuda]"
RUN python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()"
COPY jobs ./jobs
COPY configs ./configs
"""


def test_the_reference_dockerfile_passes_every_rule():
    check_cuda(GOOD, CUDA13_REQUIRES, PYPROJECT_OK)
    check_cudnn(GOOD, CUDA13_REQUIRES, PYPROJECT_OK)
    check_ray(GOOD, PYPROJECT_OK, "2.60.0")
    check_python(GOOD, PYPROJECT_OK, (3, 11))
    check_installs_project(GOOD, PYPROJECT_OK)
    check_provider_assertion(GOOD)
    check_non_root(GOOD)
    check_cache_dir(GOOD)
    check_copies_jobs_and_configs(GOOD)
    assert ray_base(GOOD) == RayBase("rayproject/ray:2.60.0-py311-cpu", "2.60.0", (3, 11), None)


@pytest.mark.parametrize(("tag", "cuda"), [("2.60.0-py311-cu128", 12), ("2.60.0-py311-cu130", 13),
                                           ("2.60.0-py311-cu118", 11), ("2.60.0-py311", None),
                                           ("2.60.0-py311-cpu-aarch64", None)])
def test_cuda_major_from_the_tag(tag, cuda):
    assert ray_base(f"FROM rayproject/ray:{tag}\n").cuda_major == cuda


@pytest.mark.parametrize(("requires", "cuda", "cudnn"), [(CUDA13_REQUIRES, 13, 9), (CUDA12_REQUIRES, 12, 9)])
def test_wheel_needs_from_either_naming(requires, cuda, cudnn):
    needs = wheel_needs(requires)
    assert (needs.cuda_major, needs.cudnn_major) == (cuda, cudnn)
    assert needs.cuda_extras == {"cuda"} and needs.cudnn_extras == {"cudnn"}


def test_wheel_without_cuda_metadata_is_reported():
    with pytest.raises(ImageMismatch, match="names no CUDA runtime wheel"):
        wheel_needs(["numpy", "protobuf"])


def test_old_cu128_image_fails_the_cuda_rule():
    message = "carries CUDA 12 but the installed onnxruntime-gpu needs CUDA 13"
    with pytest.raises(ImageMismatch, match=message):
        check_cuda(OLD_CU128, CUDA13_REQUIRES, PYPROJECT_OK)
    with pytest.raises(ImageMismatch, match="does not install the project's `cuda` extra"):
        check_cudnn(OLD_CU128, CUDA13_REQUIRES, PYPROJECT_OK)
    with pytest.raises(ImageMismatch, match="sets no USER"):
        check_non_root(OLD_CU128)
    with pytest.raises(ImageMismatch, match="asserts that 'CUDAExecutionProvider'"):
        check_provider_assertion(OLD_CU128)


def test_cpu_base_without_the_cuda_extra_fails():
    bad = GOOD.replace('".[cuda]"', ".")
    with pytest.raises(ImageMismatch, match=r"gets no CUDA 13 runtime from pip: base image .* has no CUDA"):
        check_cuda(bad, CUDA13_REQUIRES, PYPROJECT_OK)


def test_cuda_extra_without_cudnn_fails():
    pyproject = {"project": {**PYPROJECT_OK["project"],
                             "optional-dependencies": {"cuda": ["onnxruntime-gpu[cuda]>=1.20"]}}}
    check_cuda(GOOD, CUDA13_REQUIRES, pyproject)
    with pytest.raises(ImageMismatch, match=r"must ask for onnxruntime-gpu\[cudnn\]"):
        check_cudnn(GOOD, CUDA13_REQUIRES, pyproject)


def test_root_user_fails():
    with pytest.raises(ImageMismatch, match="runs as 'root'"):
        check_non_root(GOOD + "USER root\n")
    with pytest.raises(ImageMismatch, match="runs as '0:0'"):
        check_non_root(GOOD + "USER 0:0\n")


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.1"), "the driver and the cluster must run"),
    (GOOD.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.30.0"), "outside pyproject's ray"),
])
def test_mismatched_ray_tag_fails(text, message):
    with pytest.raises(ImageMismatch, match=message):
        check_ray(text, PYPROJECT_OK, "2.60.0")


@pytest.mark.parametrize("image", ["rayproject/ray:latest", "rayproject/ray:2.60.0-cpu",
                                   "rayproject/ray:2.60.0-py311-gpu",
                                   "nvidia/cuda:13.0.1-runtime-ubuntu24.04"])
def test_unpinned_or_foreign_base_fails(image):
    with pytest.raises(ImageMismatch, match="base image"):
        ray_base(f"FROM {image}\n")


def test_mismatched_python_fails():
    with pytest.raises(ImageMismatch, match=r"this environment runs Python 3\.12"):
        check_python(GOOD, PYPROJECT_OK, (3, 12))
    with pytest.raises(ImageMismatch, match="outside requires-python"):
        check_python(GOOD.replace("py311", "py39"), PYPROJECT_OK, (3, 9))


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace('".[cuda]"', "-r requirements.txt"), "does not install the project"),
    (GOOD.replace('".[cuda]"', '".[cuda]" onnxruntime-gpu==1.31.1'), r"besides the project"),
    (GOOD + "RUN pip install -r requirements.txt\n", r"besides the project"),
    (GOOD.replace('".[cuda]"', '".[cuda,gpu]"'), r"extras \['gpu'\]"),
    (GOOD.replace("COPY --chown=ray:users pyproject.toml README.md ./\n", "")
     + "COPY pyproject.toml ./\n", "COPY pyproject.toml must come before"),
])
def test_hand_written_or_misordered_install_fails(text, message):
    with pytest.raises(ImageMismatch, match=message):
        check_installs_project(text, PYPROJECT_OK)


def test_cache_dir_rules_fail():
    with pytest.raises(ImageMismatch, match="PIPELINE_CACHE_DIR is not set"):
        check_cache_dir(GOOD.replace("ENV PIPELINE_CACHE_DIR=/home/ray/.cache/onnx-pipeline\n", ""))
    with pytest.raises(ImageMismatch, match="not created by the image's user"):
        check_cache_dir(GOOD.replace('RUN mkdir -p "$PIPELINE_CACHE_DIR"\n', ""))
    check_cache_dir(OLD_CU128)  # under /tmp: writable by anyone


def test_missing_jobs_copy_fails():
    with pytest.raises(ImageMismatch, match=r"does not copy \['jobs'\]"):
        check_copies_jobs_and_configs(GOOD.replace("COPY jobs ./jobs\n", ""))


def test_parser_joins_continuations_and_drops_comments():
    text = "FROM a:b\nRUN echo 1 \\\n    # a comment\n    && echo 2\n# USER root\nUSER ray\n"
    assert [(i.keyword, i.args, i.line) for i in parse_dockerfile(text)] == [
        ("FROM", "a:b", 1), ("RUN", "echo 1 && echo 2", 2), ("USER", "ray", 6)]


def test_parser_reads_run_heredocs():
    text = "FROM a:b\nRUN <<EOF\nset -e\npip install requests\nEOF\nRUN echo $((1 << 2))\nUSER ray\n"
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "RUN", "USER"]
    assert [i.targets for i in pip_installs(instructions)] == [["requests"]]

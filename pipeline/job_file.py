"""Reading a job file: YAML, profiles merged in order, ``${ENV}`` interpolation, ``--set``
overrides, and validation against ``pipeline.spec`` with one-line errors.

Every error names the file, the key path and the value (redacted as job.json would show it).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from pipeline.errors import ConfigError
from pipeline.redaction import redact_at
from pipeline.spec import JobSpec

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(value: Any, path: str = "", keep_missing: bool = False) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a loaded YAML document."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k), keep_missing)
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, f"{path}[{i}]", keep_missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if keep_missing:
            return match.group(0)
        raise ConfigError(f"{path}: environment variable {name} is not set")

    return ENV_REF.sub(repl, value)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


_TYPE_SEGMENT = re.compile(r"^(int|float|str|bool|list|dict|none|constrained-\w+)$|\[")
_TASK_KINDS = ("embed", "classify", "tensor")


def _clean_loc(loc: tuple[Any, ...]) -> str:
    """Key path without pydantic's union/discriminator segments: task.embed.x -> task.x."""
    parts = [str(p) for p in loc if not _TYPE_SEGMENT.search(str(p))]
    if len(parts) > 1 and parts[0] == "task" and parts[1] in _TASK_KINDS:
        del parts[1]
    return ".".join(parts) or "(top level)"


def validation_message(exc: ValidationError, source: str | None = None,
                       prefix: str | None = None) -> str:
    """A pydantic error as one line: ``[source: ]key.path: what is wrong (got value)``.
    ``prefix``: the key the validated value sits at (``task`` for a task spec alone)."""
    errors = [{**e, "loc": (prefix, *e["loc"]) if prefix else e["loc"]} for e in exc.errors()]
    err = errors[0]
    key = _clean_loc(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "union_tag_invalid":
        msg = f"kind must be one of {', '.join(_TASK_KINDS)}"
    # A union reports one error per alternative; count only other keys as "more".
    alternatives = [e["msg"] for e in errors if _clean_loc(e["loc"]) == key]
    if len(alternatives) > 1:
        msg = " or ".join(dict.fromkeys(m.split(",")[0] for m in alternatives))
    more = len({_clean_loc(e["loc"]) for e in errors}) - 1
    # The value as job.json would show it: nothing under storage_options, no secret names.
    path = key.split(".") if key != "(top level)" else []
    value = redact_at(path, err.get("input"))
    shown = "" if err["type"] == "missing" else f" (got {_short(value)})"
    where = f"{source}: " if source else ""
    return f"{where}{key}: {msg}{shown}" + (f" (+{more} more)" if more > 0 else "")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_yaml(path: str | Path) -> dict[str, Any]:
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: job file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read job file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` wins; mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_job(
    source: str | Path | dict[str, Any] | JobSpec | list[str | Path],
    overrides: dict[str, Any] | list[str] | None = None,
) -> tuple[dict[str, Any], str]:
    """The job document, merged and overridden but not yet interpolated, and where it came
    from (for messages). A list of files is merged in order (a job file, then profiles)."""
    if isinstance(source, JobSpec):
        data, where = source.model_dump(mode="json"), "job"
    elif isinstance(source, dict):
        data, where = json.loads(json.dumps(source)), "job"
    elif isinstance(source, list):
        data, where = {}, " + ".join(str(s) for s in source)
        for path in source:
            data = deep_merge(data, _read_yaml(path))
    else:
        data, where = _read_yaml(source), str(source)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    return apply_overrides(data, overrides or {}), where


def validate_job(data: dict[str, Any], where: str, env: Literal["require", "keep"] = "require"
                 ) -> JobSpec:
    """Interpolate ``${VAR}`` and validate. ``env="keep"`` leaves unset variables as they are,
    for checks on a machine that does not hold the job's secrets (``pipeline.submit``)."""
    try:
        return JobSpec.model_validate(interpolate_env(data, keep_missing=env == "keep"))
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, where)) from exc
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_spec(
    source: str | Path | dict[str, Any] | JobSpec | list[str | Path],
    overrides: dict[str, Any] | list[str] | None = None,
) -> JobSpec:
    """Read, merge, interpolate, override and validate a job; raises ConfigError in one line.

    A list of files is merged in order (a job file, then profiles from configs/).
    """
    if isinstance(source, JobSpec) and not overrides:
        return source
    return validate_job(*read_job(source, overrides))


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()

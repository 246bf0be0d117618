"""Offline validation of Kubernetes manifests against the KubeRay v1.7.0 CRD schemas (tests only).

What the API server does with a custom resource, and what this module does instead:

1. Defaults. The API server fills in every ``default`` of a structural schema before it validates:
   for each property of an object (present or not), if the field is absent (or null and not
   ``nullable``) and the property's schema has a ``default``, a copy of the default is set; then it
   recurses into every field of the object, every item of an array and every value of an
   ``additionalProperties`` map, defaults included. :func:`apply_defaults` does the same, on a copy.
2. OpenAPI v3 extensions are turned into JSON Schema (draft 4, the dialect OpenAPI v3.0 builds on:
   boolean ``exclusiveMinimum``, no ``const``) by :func:`to_json_schema`:
   ``x-kubernetes-int-or-string`` (integer or string), ``nullable`` (null also allowed),
   ``x-kubernetes-preserve-unknown-fields`` (fields not described are allowed),
   ``x-kubernetes-list-type: map|set`` (items unique by their ``x-kubernetes-list-map-keys``, or
   unique items: the API server rejects duplicates too), ``format: int32|int64`` (range checked).
   Other ``x-kubernetes-*`` keys (map-type, embedded-resource) change merging, not validity, and are
   ignored. ``x-kubernetes-validations`` are CEL expressions: evaluating CEL is out of scope, so
   they are ignored (in KubeRay v1.7.0 they guard only ``managedBy``, ``deletionStrategy`` and
   ``gcsFaultToleranceOptions.backend``, none of which our manifests set).
3. Unknown fields. The API server prunes fields a structural schema does not describe (and kubectl
   only warns). Here an object schema without ``additionalProperties`` or
   ``x-kubernetes-preserve-unknown-fields`` is closed (``additionalProperties: false``), so a
   misspelled field fails instead of silently disappearing. The PodSpecs embedded in the KubeRay
   CRDs are fully described, so this also catches misspellings inside pod templates.
4. ``metadata`` is not described by a CRD (the API server checks ObjectMeta itself). It is checked
   here for what manifests use: ``name`` (required; a DNS-1035 label within KubeRay's length limits
   for Ray kinds, a DNS-1123 subdomain otherwise), ``namespace``, ``labels`` (qualified names and
   label values) and ``annotations``; any other metadata field is rejected.

ConfigMap and Secret (core ``v1``) are checked against small hand-written schemas of their shape.
KubeRay's operator-side checks (``ValidateRayJobSpec`` and friends) are not part of the CRD schema;
the manifest tests assert the ones that matter for us separately.

Every error names the JSON path of the offending field, e.g.
``spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0].resources.limits["nvidia.com/gpu"]``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft4Validator, ValidationError

KUBERAY_VERSION = "v1.7.0"
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "fixtures" / f"kuberay-{KUBERAY_VERSION}"
RAY_API_VERSION = "ray.io/v1"
CRD_SCHEMA_FILES = {
    "RayCluster": "ray.io_rayclusters.v1.json",
    "RayJob": "ray.io_rayjobs.v1.json",
    "RayCronJob": "ray.io_raycronjobs.v1.json",
}
CORE_KINDS = ("ConfigMap", "Secret")
SUPPORTED_KINDS = (*CRD_SCHEMA_FILES, *CORE_KINDS)

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
QUALIFIED_NAME = (  # label and annotation keys: an optional DNS-1123 subdomain prefix and a name
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
CONFIG_KEY = r"^[-._a-zA-Z0-9]+$"
BASE64 = r"^[A-Za-z0-9+/]*={0,2}$"

# KubeRay derives names of child objects from these names, so it bounds them (utils.ValidateRay*Metadata):
# a RayCluster name is a DNS-1035 label of at most 53 characters (63 - len("-serve-svc")), a RayJob's at
# most 47 (the generated RayCluster name adds 6). A RayCronJob's RayJobs are named after it plus a
# suffix; 36 is our own conservative bound (47 minus "-" and a 10-digit suffix), not KubeRay's number.
NAME_RULES: dict[str, tuple[str, int]] = {
    "RayCluster": (DNS1035_LABEL, 53),
    "RayJob": (DNS1035_LABEL, 47),
    "RayCronJob": (DNS1035_LABEL, 36),
    "ConfigMap": (DNS1123_SUBDOMAIN, 253),
    "Secret": (DNS1123_SUBDOMAIN, 253),
}

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# x-kubernetes-* keys handled by to_json_schema / the validator; any other one is dropped.
_KEPT_EXTENSIONS = {"x-kubernetes-list-type", "x-kubernetes-list-map-keys"}


@dataclass(frozen=True, order=True)
class SchemaError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class ManifestError(ValueError):
    """A manifest does not validate; ``errors`` lists every problem with its path."""

    def __init__(self, where: str, errors: Sequence[SchemaError]):
        self.errors = list(errors)
        super().__init__(f"{where}: {len(self.errors)} error(s)\n" + "\n".join(f"  {e}" for e in self.errors))


# --- schemas ---------------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The raw openAPIV3Schema of a KubeRay kind (ray.io/v1), as the CRD ships it."""
    try:
        name = CRD_SCHEMA_FILES[kind]
    except KeyError:
        raise KeyError(f"no CRD schema for kind {kind!r} (known: {', '.join(CRD_SCHEMA_FILES)})") from None
    with (SCHEMA_DIR / name).open(encoding="utf-8") as fh:
        return json.load(fh)


def to_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Convert a structural OpenAPI v3 schema into a draft-4 JSON Schema with closed objects."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_json_schema(prop) for name, prop in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key in ("nullable", "description", "default", "example", "externalDocs"):
            continue  # nullable: below; the others do not constrain values
        elif key.startswith("x-kubernetes-") and key not in _KEPT_EXTENSIONS:
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and not schema.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    if schema.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def _string_map(key_pattern: str, value_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "patternProperties": {key_pattern: value_schema or {"type": "string"}},
        "additionalProperties": False,
    }


def metadata_schema(kind: str) -> dict[str, Any]:
    pattern, max_length = NAME_RULES[kind]
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": pattern, "minLength": 1, "maxLength": max_length},
            "namespace": {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63},
            "labels": _string_map(
                QUALIFIED_NAME, {"type": "string", "pattern": LABEL_VALUE, "maxLength": 63}
            ),
            "annotations": _string_map(QUALIFIED_NAME),
        },
        "additionalProperties": False,
    }


def _core_schema(kind: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": [kind]},
        "metadata": metadata_schema(kind),
        "immutable": {"type": "boolean"},
        "data": _string_map(CONFIG_KEY, {"type": "string", "pattern": BASE64} if kind == "Secret" else None),
    }
    if kind == "ConfigMap":
        properties["binaryData"] = _string_map(CONFIG_KEY, {"type": "string", "pattern": BASE64})
    else:
        properties["stringData"] = _string_map(CONFIG_KEY)
        properties["type"] = {"type": "string", "minLength": 1}
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": properties,
        "additionalProperties": False,
    }


@functools.cache
def manifest_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema a whole manifest of ``kind`` is validated against (after defaulting)."""
    if kind in CORE_KINDS:
        return _core_schema(kind)
    raw = crd_schema(kind)
    root = to_json_schema(raw)
    root["properties"]["apiVersion"] = {"enum": [RAY_API_VERSION]}
    root["properties"]["kind"] = {"enum": [kind]}
    root["properties"]["metadata"] = metadata_schema(kind)
    root["required"] = sorted({*root.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return root


# --- the validator ---------------------------------------------------------------------------


def _list_type(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """x-kubernetes-list-type: items of a ``map`` list are unique by their keys, of a ``set`` list unique."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: dict[str, int] = {}
    for index, item in enumerate(instance):
        if list_type == "map":
            if not isinstance(item, dict):
                continue
            identity = json.dumps([item.get(k) for k in keys], sort_keys=True, default=str)
            what = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
        else:
            identity = json.dumps(item, sort_keys=True, default=str)
            what = repr(item)
        if identity in seen:
            yield ValidationError(f"duplicate entry ({what}): same as [{seen[identity]}]", path=[index])
        else:
            seen[identity] = index


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, (low, high) in _INT_RANGES.items():

        def in_range(value: Any, low: int = low, high: int = high) -> bool:
            if isinstance(value, bool) or not isinstance(value, int):
                return True  # the type keyword reports non-integers
            return low <= value <= high

        checker.checks(name)(in_range)
    return checker


KubeValidator = jsonschema.validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def _validator(kind: str) -> Any:
    return KubeValidator(manifest_schema(kind), format_checker=_format_checker())


# --- defaults --------------------------------------------------------------------------------


def _tree_copy(value: Any) -> Any:
    """A deep copy that also unshares YAML aliases (one node reached twice becomes two objects)."""
    if isinstance(value, dict):
        return {k: _tree_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree_copy(v) for v in value]
    return value


def _default_in_place(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name, prop in properties.items():
            if "default" not in prop:
                continue
            if name not in value or (value[name] is None and not prop.get("nullable")):
                value[name] = copy.deepcopy(prop["default"])
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                _default_in_place(item, properties[name])
            elif isinstance(extra, dict):
                _default_in_place(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(item, schema["items"])


def apply_defaults(instance: Any, schema: dict[str, Any]) -> Any:
    """A copy of ``instance`` with the structural-schema defaults of ``schema`` filled in."""
    result = _tree_copy(instance)
    _default_in_place(result, schema)
    return result


def defaulted(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as the API server would store it: CRD defaults applied (core kinds: copied)."""
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    if kind in CRD_SCHEMA_FILES:
        return apply_defaults(manifest, crd_schema(kind))
    return _tree_copy(manifest)


# --- errors and entry points -----------------------------------------------------------------

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def format_path(parts: Sequence[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _describe(error: ValidationError) -> list[SchemaError]:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
        extras = [k for k in error.instance if k not in known and not any(p.search(k) for p in patterns)]
        if extras:
            hint = "unknown field" if known else "key not allowed here"
            return [SchemaError(format_path([*path, k]), f"{hint} {k!r}") for k in extras]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance and repr(k) in error.message]
        return [SchemaError(format_path([*path, k]), "required field is missing") for k in missing[:1]]
    message = error.message
    if error.validator == "anyOf" and error.context:
        details = sorted({sub.message for sub in error.context})
        message = f"{error.instance!r} is none of the allowed forms ({'; '.join(details)})"
    return [SchemaError(format_path(path), message)]


def validate_manifest(manifest: Any) -> list[SchemaError]:
    """Every schema error of one manifest (after defaults), sorted by path; [] when it is valid."""
    if not isinstance(manifest, dict):
        return [SchemaError("", f"a manifest must be a mapping, got {type(manifest).__name__}")]
    kind = manifest.get("kind")
    if kind not in SUPPORTED_KINDS:
        return [SchemaError("kind", f"unsupported kind {kind!r} (supported: {', '.join(SUPPORTED_KINDS)})")]
    document = defaulted(manifest)
    errors: set[SchemaError] = set()
    for error in _validator(kind).iter_errors(document):
        errors.update(_describe(error))
    return sorted(errors)


def check_manifest(manifest: Any, where: str = "manifest") -> dict[str, Any]:
    """The defaulted manifest; raises ManifestError listing every error when it does not validate."""
    errors = validate_manifest(manifest)
    if errors:
        raise ManifestError(where, errors)
    return defaulted(manifest)


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """All YAML documents of a file (empty documents skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


# --- KubeRay checks outside the schema -------------------------------------------------------

_CRON_FIELDS = (  # name, low, high, names (robfig/cron ParseStandard, which KubeRay uses)
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)


def cron_schedule_errors(schedule: Any) -> list[str]:
    """Problems of a standard 5-field cron expression ([] when valid), as KubeRay's RayCronJob parses it.

    Fields: minute hour day-of-month month day-of-week; each a comma list of ``*``, ``N`` or ``N-M``,
    optionally ``/STEP``; month and weekday also take names (JAN, SUN). ``?`` stands for ``*`` in the
    day fields. Descriptors (``@daily``) and ``TZ=``/``CRON_TZ=`` prefixes are refused here: the
    manifests use 5 fields and ``spec.timeZone``.
    """
    if not isinstance(schedule, str):
        return [f"schedule must be a string, got {type(schedule).__name__}"]
    if "TZ" in schedule:
        return ["TZ/CRON_TZ in the schedule is refused by KubeRay: use spec.timeZone"]
    fields = schedule.split()
    if len(fields) != 5:
        return [f"{schedule!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(fields)}"]
    problems = []
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):

        def value(token: str, names: tuple[str, ...] = names) -> int:
            if token.upper() in names:
                return names.index(token.upper()) + (1 if len(names) == 12 else 0)
            if not token.isdigit():
                raise ValueError(token)
            return int(token)

        for item in text.split(","):
            base, _, step = item.partition("/")
            try:
                if step and (not step.isdigit() or int(step) == 0):
                    raise ValueError(item)
                if base == "*" or (base == "?" and name in ("day of month", "day of week")):
                    continue
                first, _, last = base.partition("-")
                start = value(first)
                end = value(last) if last else start
                if not (low <= start <= end <= high):
                    raise ValueError(item)
            except ValueError:
                problems.append(f"{schedule!r}: {name} field {text!r}: {item!r} is not valid ({low}-{high})")
    return problems

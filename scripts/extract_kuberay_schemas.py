"""Extract the OpenAPI v3 schemas of the KubeRay CRDs into compact JSON test fixtures.

    python scripts/extract_kuberay_schemas.py SRC_DIR OUT_DIR [--version v1]

SRC_DIR holds the CRDs as released (KubeRay's ray-operator/config/crd/bases/: ray.io_rayclusters.yaml,
ray.io_rayjobs.yaml, ray.io_raycronjobs.yaml, ...). For every CRD, the schema of the requested version
(default v1, which must be both served and the storage version) is written to
OUT_DIR/<crd file stem>.<version>.json as compact JSON with sorted keys, so the output is byte-for-byte
reproducible from the same input. Nothing else of the CRD is kept: the tests validate manifests against
``spec.versions[].schema.openAPIV3Schema`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml

SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def extract(crd_path: Path, version: str) -> tuple[str, dict]:
    """The CRD's kind and the openAPIV3Schema of ``version``; refuses a version not served and stored."""
    with crd_path.open(encoding="utf-8") as fh:
        crd = yaml.load(fh, Loader=SAFE_LOADER)
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"{crd_path}: not a CustomResourceDefinition")
    kind = crd["spec"]["names"]["kind"]
    for entry in crd["spec"]["versions"]:
        if entry["name"] != version:
            continue
        if not (entry.get("served") and entry.get("storage")):
            raise ValueError(f"{crd_path}: {kind} {version} is not the served storage version")
        return kind, entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd_path}: {kind} has no version {version}")


def dump(schema: dict) -> bytes:
    return json.dumps(schema, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode() + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src_dir", type=Path, help="folder with the CRD YAML files (ray.io_*.yaml)")
    parser.add_argument("out_dir", type=Path, help="folder for the JSON schemas")
    parser.add_argument("--version", default="v1", help="CRD version to extract (default: v1)")
    args = parser.parse_args(argv)

    sources = sorted(args.src_dir.glob("ray.io_*.yaml"))
    if not sources:
        print(f"error: {args.src_dir}: no ray.io_*.yaml CRD files", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        kind, schema = extract(src, args.version)
        data = dump(schema)
        out = args.out_dir / f"{src.stem}.{args.version}.json"
        out.write_bytes(data)
        print(f"{kind:<12} {src.name} sha256={hashlib.sha256(src.read_bytes()).hexdigest()}"
              f" -> {out.name} ({len(data):,} bytes) sha256={hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

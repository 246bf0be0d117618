"""fsspec storage options -> the options of Rust ``object_store`` (used by deltalake and lance).

A job states its output storage once, the way fsspec/s3fs takes it (``key``, ``secret``,
``client_kwargs.endpoint_url``...). The table libraries talk to storage through their own
client, which reads differently named keys; this maps one onto the other. Keys already in the
object_store spelling (``AWS_...``, ``aws_...``, ``google_...``, ``azure_...``) pass through,
so anything the mapping does not know can still be given.
"""

from __future__ import annotations

from typing import Any

_PASS_THROUGH = ("aws_", "google_", "azure_", "allow_", "timeout", "connect_timeout")


def object_store_options(uri: str, fsspec_options: dict[str, Any] | None) -> dict[str, str]:
    """String options for deltalake / lance for ``uri``; {} for local paths.

    Also: ``table_path(uri)`` gives the path these libraries take for the same place."""
    options = dict(fsspec_options or {})
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    out: dict[str, str] = {}
    for key, value in options.items():
        if key.lower().startswith(_PASS_THROUGH) and value is not None:
            out[key.lower()] = _text(value)
    if scheme not in ("s3", "s3a"):
        return out
    client = options.get("client_kwargs") or {}
    config = options.get("config_kwargs") or {}
    mapping = {
        "aws_access_key_id": options.get("key"),
        "aws_secret_access_key": options.get("secret"),
        "aws_session_token": options.get("token"),
        "aws_endpoint": options.get("endpoint_url") or client.get("endpoint_url"),
        "aws_region": client.get("region_name") or config.get("region_name"),
    }
    for key, value in mapping.items():
        if value is not None:
            out.setdefault(key, _text(value))
    if options.get("anon"):
        out.setdefault("aws_skip_signature", "true")
    endpoint = out.get("aws_endpoint", "")
    if endpoint.startswith("http://"):
        out.setdefault("allow_http", "true")
    if "aws_endpoint" in out:  # a custom endpoint (MinIO, moto, R2...) addresses by path
        out.setdefault("aws_virtual_hosted_style_request", "false")
    out.setdefault("aws_region", "us-east-1")
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table_path(uri: str) -> str:
    """The output root as deltalake and lance take it: a plain path for local files."""
    return uri[len("file://"):] if uri.startswith("file://") else uri

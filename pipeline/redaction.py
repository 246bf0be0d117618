"""Secrets never leave the process: redaction for job.json, reports and error messages.

Rule: every value under a ``storage_options`` mapping (input, model, output, anywhere) is
replaced by ``***`` unless its key is one of a few harmless settings (``SAFE_OPTIONS``) or the
value is a boolean; nested mappings (``client_kwargs``, ``config_kwargs``, ...) keep their
shape under the same rule. Outside storage_options, values under secret-looking key names are
replaced. ``scrub`` removes those same secret values from free text (a library's exception
message may echo a parameter).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
# Redacted wherever they appear, even outside storage_options and under a harmless parent.
SECRET_KEY = re.compile(r"(secret|token|password|passwd|credential|private|session|"
                        r"connection_string|(^|_)key$|(^|_)sas(_|$))", re.I)
# Storage options and table catalog properties (input.catalog, output.catalog): who asks.
STORAGE_OPTIONS = re.compile(r"storage_?options?|catalog", re.I)
# Kept under storage_options: where and how a store is reached, never who is asking.
SAFE_OPTIONS = frozenset({
    # s3fs / botocore
    "endpoint_url", "region_name", "region", "anon", "use_ssl", "requester_pays",
    "default_block_size", "default_fill_cache", "default_cache_type", "version_aware",
    "cache_regions", "max_concurrency", "signature_version", "addressing_style",
    "connect_timeout", "read_timeout", "max_pool_connections", "max_attempts", "mode",
    "skip_instance_cache", "use_listings_cache", "listings_expiry_time",
    # gcsfs
    "project", "access", "consistency", "default_location", "requests_timeout",
    # adlfs
    "account_name", "blocksize", "location_mode",
    # pyiceberg catalog properties
    "type", "uri", "warehouse", "s3.endpoint", "s3.region", "client.region", "py-io-impl",
})
MIN_SCRUB = 8  # shorter values are too likely to occur in ordinary text
_USERINFO = re.compile(r"(://[^/:@\s]+:)[^/@\s]+@")


def redact(value: Any, _options: bool = False) -> Any:
    """A copy of a job document (or any part of it) with secrets replaced by ``***``."""
    if isinstance(value, dict):
        return {k: _redact_entry(str(k), v, _options) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, _options) for v in value]
    if _options and not (value is None or isinstance(value, bool) or value == ""):
        return REDACTED  # a value under storage_options without a harmless key
    if isinstance(value, str):  # a password inside any URI: https://user:pass@host/...
        return _USERINFO.sub(r"\1***@", value)
    return value


def redact_uri(uri: str) -> str:
    """``uri`` without the password of a ``user:password@`` part, for markers and reports."""
    return _USERINFO.sub(r"\1***@", uri)


def _redact_entry(key: str, value: Any, options: bool) -> Any:
    if value is None or (isinstance(value, str) and value == ""):
        return value
    if SECRET_KEY.search(key):
        return REDACTED
    if STORAGE_OPTIONS.fullmatch(key):  # a misspelt key is hidden the same way
        return redact(value, True)
    if options and key in SAFE_OPTIONS and not isinstance(value, (dict, list)):
        return _USERINFO.sub(r"\1***@", value) if isinstance(value, str) else value
    return redact(value, options)


def redact_at(path: list[str], value: Any) -> Any:
    """``value`` redacted as if it sat at ``path`` (key names) in a job document: a string
    given as ``input.storage_options`` is hidden whole."""
    wrapped = value
    for part in reversed(path):
        wrapped = {part: wrapped}
    redacted = redact(wrapped)
    for part in path:
        redacted = redacted[part]
    return redacted


def secret_values(*storage_options: dict[str, Any] | None) -> set[str]:
    """The strings ``redact`` hides in these storage_options (long enough to scrub)."""
    found: set[str] = set()

    def collect(original: Any) -> None:
        if isinstance(original, dict):
            for v in original.values():
                collect(v)
        elif isinstance(original, list):
            for v in original:
                collect(v)
        elif original is not None and not isinstance(original, bool):
            text = str(original)
            if len(text) >= MIN_SCRUB:
                found.add(text)

    def walk(original: Any, redacted: Any) -> None:
        if isinstance(original, dict) and isinstance(redacted, dict):
            for k, v in original.items():
                walk(v, redacted.get(k))
        elif isinstance(original, list) and isinstance(redacted, list):
            for a, b in zip(original, redacted, strict=False):
                walk(a, b)
        elif redacted == REDACTED and original != REDACTED:
            collect(original)

    for options in storage_options:
        if options:
            walk(options, redact({"storage_options": options})["storage_options"])
    return found


def scrub(text: str, *storage_options: dict[str, Any] | None) -> str:
    """``text`` with every secret value of these storage_options replaced by ``***``."""
    for secret in sorted(secret_values(*storage_options), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _USERINFO.sub(r"\1***@", text)

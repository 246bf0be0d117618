"""Secrets redacted by default: every storage_options value but a few harmless settings;
secret-looking names anywhere; validation errors and library messages never echo a secret."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.job_file import load_spec
from pipeline.redaction import REDACTED, redact, scrub, secret_values

OPTIONS = {
    "account_name": "acct",
    "account_key": "AZURE-ACCOUNT-KEY-123",
    "connection_string": "DefaultEndpointsProtocol=https;AccountKey=abc123xyz",
    "sas_token": "sv=2024&sig=SIGNATURE",
    "anon": False,
    "made_up_name": "a-secret-under-an-innocent-name",
    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1",
                      "aws_secret_access_key": "AWS-SECRET-ACCESS-KEY"},
    "config_kwargs": {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 5}},
}


def test_storage_options_redacted_but_harmless_settings():
    doc = redact({"input": {"uri": "abfs://c/in", "storage_options": OPTIONS},
                  "model": {"uri": "s3://b/m", "storage_options": {"key": "AKIA", "secret": "s"}},
                  "output": {"uri": "s3://b/o", "storage_options": {}}})
    opts = doc["input"]["storage_options"]
    for name in ("account_key", "connection_string", "sas_token", "made_up_name"):
        assert opts[name] == REDACTED, name
    assert opts["account_name"] == "acct" and opts["anon"] is False
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000",
                                     "region_name": "eu-west-1",
                                     "aws_secret_access_key": REDACTED}
    assert opts["config_kwargs"] == OPTIONS["config_kwargs"]
    assert doc["model"]["storage_options"] == {"key": REDACTED, "secret": REDACTED}
    assert doc["input"]["uri"] == "abfs://c/in" and doc["output"]["storage_options"] == {}


@pytest.mark.parametrize("name", ["account_key", "connection_string", "sas_token", "token", "key",
                                  "secret", "password", "credential", "credentials", "api_key"])
def test_secret_names_redacted_everywhere(name):
    # Outside storage_options too, and even under a key that is harmless inside it.
    assert redact({"providers": {"options": {"cuda": {name: "x"}}}}) == \
        {"providers": {"options": {"cuda": {name: REDACTED}}}}
    assert redact({"storage_options": {"client_kwargs": {"region_name": {name: "x"}}}}) == \
        {"storage_options": {"client_kwargs": {"region_name": {name: REDACTED}}}}


def test_password_in_an_endpoint_url_is_hidden():
    doc = redact({"storage_options": {"endpoint_url": "https://user:pa55@minio.local:9000"}})
    assert doc == {"storage_options": {"endpoint_url": "https://user:***@minio.local:9000"}}


def test_scrub_removes_secret_values_from_messages():
    assert secret_values(OPTIONS) >= {"AZURE-ACCOUNT-KEY-123", "AWS-SECRET-ACCESS-KEY"}
    text = ("Invalid type for parameter SSECustomerKey, value: AWS-SECRET-ACCESS-KEY; "
            "conn DefaultEndpointsProtocol=https;AccountKey=abc123xyz at http://127.0.0.1:9000")
    assert scrub(text, OPTIONS, None) == ("Invalid type for parameter SSECustomerKey, value: ***; "
                                          "conn *** at http://127.0.0.1:9000")


def test_validation_error_on_storage_options_does_not_print_the_secret():
    job = {"input": {"uri": "in", "storage_options": "AccountKey=TOPSECRETVALUE"},
           "model": {"uri": "m"}, "task": {"kind": "embed"}, "output": {"uri": "o"}}
    with pytest.raises(ConfigError) as caught:
        load_spec(job)
    assert "TOPSECRETVALUE" not in str(caught.value)
    assert str(caught.value).startswith("job: input.storage_options: Input should be a valid "
                                        'dictionary (got "***")')


@pytest.mark.parametrize("mistake", ["typo", "neighbour", "parent"])
def test_validation_errors_near_storage_options_do_not_print_them(mistake):
    secret = {"weird": "TOPSECRETVALUE"}
    job = {"input": {"uri": "in", "storage_options": secret}, "model": {"uri": "m"},
           "task": {"kind": "embed"}, "output": {"uri": "o"}}
    if mistake == "typo":  # an unknown key is shown with its value: this one stays hidden
        job["output"]["storage_option"] = secret
    elif mistake == "neighbour":
        job["input"]["colour"] = "red"
    else:  # the whole section is shown
        job["input"]["uri"] = 5
        job["input"] = [job["input"]]
    with pytest.raises(ConfigError) as caught:
        load_spec(job)
    assert "TOPSECRETVALUE" not in str(caught.value), str(caught.value)

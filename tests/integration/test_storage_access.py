"""No credentials, refused credentials, access denied and missing buckets on a real S3 endpoint:
exit 2 and one line naming the job key, the URI and the cause, for input, model and output.

Missing credentials: every AWS_* variable cleared and the shared config and credentials files
pointed at empty files, so botocore finds nothing. Access denied: a second moto server with
IAM authentication on (``INITIAL_NO_AUTH_ACTION_COUNT``), with users whose policies allow only
part of what a job needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.demo.tabular import make_scoring_table
from pipeline.run import main
from tests.reliability.harness import MODELS
from tests.support.fixtures import free_port


def write_job(tmp_path: Path, job: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    return str(path)


def cli_error(tmp_path: Path, job: dict, capsys) -> tuple[int, str]:
    """The job through the CLI in this process: its exit code and its one stderr line."""
    code = main([write_job(tmp_path, job), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return code, err


@pytest.fixture()
def local_job(tmp_path) -> dict:
    (tmp_path / "in").mkdir()
    pq.write_table(make_scoring_table(40, seed=1), tmp_path / "in" / "a.parquet")
    return {"input": {"uri": str(tmp_path / "in")},
            "model": {"uri": str(MODELS / "breast_cancer")},
            "task": {"kind": "classify"}, "passthrough": ["id"],
            "output": {"uri": str(tmp_path / "out")}}


@pytest.fixture()
def no_aws_credentials(tmp_path, monkeypatch) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    empty = tmp_path / "empty-aws-config"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem that found credentials earlier
    yield
    s3fs.S3FileSystem.clear_instance_cache()


# ----------------------------------------------------------------------------- no credentials

NO_CREDENTIALS = [
    ("input", "input.uri: s3://bkt/in: no credentials found (set AWS_ACCESS_KEY_ID/"
              "AWS_SECRET_ACCESS_KEY or input.storage_options)"),
    ("model", "model.uri: s3://bkt/models/bc: no credentials found (set AWS_ACCESS_KEY_ID/"
              "AWS_SECRET_ACCESS_KEY or model.storage_options)"),
    ("output", "output.uri: s3://bkt/out: no credentials found (set AWS_ACCESS_KEY_ID/"
               "AWS_SECRET_ACCESS_KEY or output.storage_options)"),
]


@pytest.mark.parametrize(("section", "expected"), NO_CREDENTIALS, ids=[c[0] for c in NO_CREDENTIALS])
def test_no_credentials_exit_2_naming_the_key(section, expected, local_job, s3_server, tmp_path,
                                              capsys, no_aws_credentials):
    uri = {"input": "s3://bkt/in", "model": "s3://bkt/models/bc", "output": "s3://bkt/out"}[section]
    local_job[section] = {**local_job[section], "uri": uri,
                          "storage_options": {"client_kwargs": {"endpoint_url": s3_server}}}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert code == 2
    assert err == f"error: {expected}"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- missing bucket


@pytest.mark.parametrize("section", ["input", "model", "output"])
def test_missing_bucket_exit_2_naming_the_key(section, local_job, s3_options, tmp_path, capsys):
    uri = {"input": "s3://no-such-bucket-x/in", "model": "s3://no-such-bucket-x/models/bc",
           "output": "s3://no-such-bucket-x/out"}[section]
    local_job[section] = {**local_job[section], "uri": uri, "storage_options": s3_options}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert code == 2
    assert err == f"error: {section}.uri: {uri}: bucket does not exist"


def test_missing_bucket_under_a_glob(local_job, s3_options, tmp_path, capsys):
    local_job["input"] = {"uri": "s3://no-such-bucket-x/in/*.parquet", "storage_options": s3_options}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert (code, err) == (2, "error: input.uri: s3://no-such-bucket-x/in/*.parquet: "
                              "bucket does not exist")


# ----------------------------------------------------------------------------- access denied


class AuthS3:
    """A moto server that checks every request against IAM: users get only what a test allows."""

    def __init__(self, url: str, admin: dict) -> None:
        self.url = url
        self.admin = admin
        self._users = 0

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.admin["key"],
                            aws_secret_access_key=self.admin["secret"])

    def options(self, key: str, secret: str) -> dict:
        return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": self.url},
                "skip_instance_cache": True}

    def user(self, statements: list[dict]) -> dict:
        """storage_options of a new user allowed ``statements`` (IAM policy statements)."""
        self._users += 1
        name = f"user{self._users}"
        iam = self.client("iam")
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        return self.options(key["AccessKeyId"], key["SecretAccessKey"])


def allow(actions: list[str], *resources: str) -> dict:
    return {"Effect": "Allow", "Action": actions, "Resource": list(resources)}


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory) -> Iterator[AuthS3]:
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    # The first 3 requests go unchecked: they create the admin user that makes the rest.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:  # a TCP probe, not a request: requests count against the unchecked three
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="admin")
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [allow(["*"], "*")]}))
        server = AuthS3(url, {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]})
        server.client("s3").create_bucket(Bucket="bkt")
        fs = s3fs.S3FileSystem(**server.options(server.admin["key"], server.admin["secret"]))
        fs.put(str(MODELS / "breast_cancer") + "/", "bkt/models/bc/", recursive=True)
        fs.pipe("bkt/in/a.parquet", _parquet_bytes())
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _parquet_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    pq.write_table(make_scoring_table(40, seed=1), buf)
    return buf.getvalue()


def test_unknown_access_key_is_refused_for_input(auth_s3, local_job, tmp_path, capsys):
    local_job["input"] = {"uri": "s3://bkt/in", "storage_options": auth_s3.options("AKIAUNKNOWN",
                                                                                   "nope")}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert code == 2
    assert err == ("error: input.uri: s3://bkt/in: access denied (403, InvalidAccessKeyId: the "
                   "access key id is unknown)")


def test_listing_allowed_but_reading_denied_stops_at_the_footer(auth_s3, local_job, tmp_path,
                                                                 capsys):
    options = auth_s3.user([allow(["s3:ListBucket"], "arn:aws:s3:::bkt")])
    local_job["input"] = {"uri": "s3://bkt/in", "storage_options": options}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert (code, err) == (2, "error: input.uri: s3://bkt/in/a.parquet: access denied (403)")


def test_model_read_denied(auth_s3, local_job, tmp_path, capsys):
    options = auth_s3.user([allow(["s3:ListBucket"], "arn:aws:s3:::bkt"),
                            allow(["s3:GetObject"], "arn:aws:s3:::bkt/in/*")])
    local_job["model"] = {"uri": "s3://bkt/models/bc", "storage_options": options}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert (code, err) == (2, "error: model.uri: s3://bkt/models/bc: access denied (403)")


@pytest.mark.usefixtures("ray_cluster")
def test_output_write_denied_when_preparing_the_output(auth_s3, local_job, tmp_path, capsys):
    """Reading the output (plan.json of an earlier run) is allowed, writing is not: the job
    stops when it prepares the output, after Ray started, before any worker runs."""
    options = auth_s3.user([allow(["s3:ListBucket"], "arn:aws:s3:::bkt"),
                            allow(["s3:GetObject"], "arn:aws:s3:::bkt/*")])
    local_job["output"] = {"uri": "s3://bkt/out", "storage_options": options}
    code, err = cli_error(tmp_path, local_job, capsys)
    assert (code, err) == (2, "error: output.uri: s3://bkt/out: access denied (403)")
    admin = s3fs.S3FileSystem(**auth_s3.options(auth_s3.admin["key"], auth_s3.admin["secret"]))
    assert not admin.exists("bkt/out")

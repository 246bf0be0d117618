"""A job whose storage_options carry secrets writes none of them: job.json keeps only harmless
settings, and the report, markers and summary never mention storage_options at all."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.demo.tabular import make_scoring_table
from tests.reliability.harness import MODELS

pytestmark = pytest.mark.usefixtures("ray_cluster")

# The local filesystem accepts and ignores options it does not know, so these travel the
# whole way (driver, workers) without a cloud account.
SECRET_OPTIONS = {
    "account_name": "acct",
    "account_key": "ACCOUNT-KEY-VALUE-1",
    "connection_string": "DefaultEndpointsProtocol=https;AccountKey=CONN-SECRET-2",
    "sas_token": "sv=2024&sig=SAS-SECRET-3",
    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_secret_access_key": "AWS-SECRET-4"},
}
SECRETS = ("ACCOUNT-KEY-VALUE-1", "CONN-SECRET-2", "SAS-SECRET-3", "AWS-SECRET-4")


def test_job_json_report_and_markers_hold_no_secret(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    pq.write_table(make_scoring_table(60, seed=4), tmp_path / "in" / "a.parquet")
    job = {"input": {"uri": str(tmp_path / "in"), "storage_options": SECRET_OPTIONS},
           "model": {"uri": str(MODELS / "breast_cancer"), "storage_options": SECRET_OPTIONS},
           "task": {"kind": "classify"}, "passthrough": ["id"],
           "sharding": {"rows_per_shard": 30}, "workers": {"cpu": {"replicas": 1}},
           "output": {"uri": str(tmp_path / "out"), "storage_options": SECRET_OPTIONS}}
    result = pipeline.run_job(job, progress=False)
    assert result.exit_code == 0

    spec = json.loads((tmp_path / "out" / "_pipeline" / "job.json").read_text())["spec"]
    for section in ("input", "model", "output"):
        assert spec[section]["storage_options"] == {
            "account_name": "acct", "account_key": "***", "connection_string": "***",
            "sas_token": "***",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_secret_access_key": "***"},
        }
    written = [p.read_text() for p in (tmp_path / "out" / "_pipeline").rglob("*.json")]
    assert len(written) >= 5  # job, plan, report, two markers
    everything = "\n".join([*written, json.dumps(result.report.to_dict()), capsys.readouterr().out])
    for secret in SECRETS:
        assert secret not in everything

"""Session-wide real components: one Ray cluster and one S3 endpoint (moto server) per run."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

S3_KEY = "testing"
S3_SECRET = "testing-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout_s}s")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real local Ray cluster shared by the whole session.

    Logical resources: 4 CPUs so two jobs' worth of 1-CPU actors fit on a 2-core machine
    without starving each other, and 1 GPU so GPU pools schedule (and fall back to CPU).
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers inherit it: shipped and fetched bundles go to a cache of this test session.
    os.environ["PIPELINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("bundle-cache"))
    if not ray.is_initialized():
        # address="local": a new cluster, never one a `ray start` on this machine left behind.
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server mode) on 127.0.0.1; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_options(s3_server: str) -> dict:
    return {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": s3_server}}


@pytest.fixture()
def s3_bucket(s3_options: dict, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test; yields its name."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40] + \
        f"-{int(time.time() * 1000) % 100000}"
    fs.mkdir(name)
    return name


@pytest.fixture(scope="session")
def text_rows() -> list[str]:
    from pipeline.demo.text import make_text_table

    return make_text_table(600, seed=3)["text"].to_pylist()


def write_text_parquet(path: Path, texts: list[str], start_id: int = 0,
                       row_group_size: int = 50) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(range(start_id, start_id + len(texts)), pa.int64()),
                      "text": texts})
    pq.write_table(table, path, row_group_size=row_group_size)

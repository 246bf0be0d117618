"""python -m pipeline.submit JOB.yaml [PROFILE.yaml ...] --address http://HEAD:8265

Checks a job here, submits it to a Ray cluster with Ray's JobSubmissionClient, follows its
logs and exits with the job's own exit code (0, 1 or 2, as `python -m pipeline.run`).

What it sends: a working directory holding the merged job file (``${VAR}`` references kept,
so no secret is written into it) and, when model.uri is a local bundle, a copy of the bundle,
which the job's driver then ships to every node. Input and output must be on storage every
node reaches (object storage, or a filesystem mounted everywhere with
storage.shared_filesystem: true). The cluster runs the pipeline installed in its image.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli_common import run_cli
from pipeline.errors import ConfigError, one_line
from pipeline.job_file import read_job, validate_job
from pipeline.locality import is_node_local
from pipeline.models.importing import open_model
from pipeline.spec import JobSpec

JOB_FILE = "job.yaml"
BUNDLE_DIR = "bundle"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="+", help="job file, then optional profiles (YAML)")
    parser.add_argument("--address", required=True,
                        help="the cluster's dashboard, e.g. http://head:8265 (RAY_ADDRESS style)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a job key")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this environment variable of this machine to the job")
    parser.add_argument("--fresh", action="store_true", help="discard earlier output")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the submission id and return without following the job")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def check_for_cluster(spec: JobSpec) -> None:
    """Refuse what cannot work on a remote cluster, before anything is sent (exit 2)."""
    for key, uri in (("input.uri", spec.input.uri), ("output.uri", spec.output.uri)):
        if uri is None or not is_node_local(uri):
            continue
        path = uri.split("://", 1)[-1]
        if not spec.storage.shared_filesystem:
            raise ConfigError(
                f"{key}: {uri} is a path on this machine, which the cluster's nodes do not "
                "see; use object storage (s3://, gs://, ...) or, for a filesystem every node "
                "mounts, an absolute path with storage.shared_filesystem: true")
        if not path.startswith("/"):
            raise ConfigError(f"{key}: {uri} must be an absolute path on the cluster's shared "
                              "filesystem (a relative path would resolve in the job's "
                              "working directory there)")


def stage(data: dict[str, Any], spec: JobSpec, folder: Path) -> None:
    """Write the working directory: the job file and, for a local model, the bundle."""
    model_path = spec.model.uri.split("://", 1)[-1]
    on_shared_fs = spec.storage.shared_filesystem and model_path.startswith("/")
    if is_node_local(spec.model.uri) and not on_shared_fs:  # else the nodes see it as it is
        # A bundle, or a converter's output imported here: the cluster gets the bundle.
        bundle, _ = open_model(spec.model.uri, None, spec.model.sha256)  # hash checked here
        shutil.copytree(bundle.path, folder / BUNDLE_DIR,
                        ignore=shutil.ignore_patterns(".*"))
        data = {**data, "model": {**data["model"], "uri": BUNDLE_DIR}}
    (folder / JOB_FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    source = args.job[0] if len(args.job) == 1 else list(args.job)
    data, where = read_job(source, args.overrides)
    spec = validate_job(data, where, env="keep")  # the secrets may live on the cluster only
    check_for_cluster(spec)
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise ConfigError(f"--env {missing[0]}: not set in this environment")
    try:
        client = JobSubmissionClient(args.address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address {args.address}: cannot reach the Ray job API "
                          f"({one_line(exc, 200)})") from exc
    entrypoint = f"python -m pipeline.run {JOB_FILE} --no-progress" + (" --fresh" if args.fresh
                                                                       else "")
    with tempfile.TemporaryDirectory(prefix="pipeline-submit-") as folder:
        stage(data, spec, Path(folder))
        env_vars = {name: os.environ[name] for name in args.env}
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": folder, **({"env_vars": env_vars} if env_vars else {})},
            metadata={"job_name": spec.name})
    print(f"submitted {job_id} to {args.address} (job {spec.name})", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {args.address} -f {job_id}")
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    info = client.get_job_info(job_id)
    while not info.status.is_terminal():  # the log stream can close a moment before the end
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    print(f"error: job {job_id} ended {info.status.value}: {info.message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: submit(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

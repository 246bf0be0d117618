"""make chaos: several trials of every fault at a larger size, then a table.

    python -m tests.reliability.chaos [--trials 5] [--rows 2000] [--faults worker_kill,...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability import harness, table_faults
from tests.support.fixtures import S3_KEY, S3_SECRET, free_port, wait_http

FAULTS = ["worker_kill", "node_loss", "driver_kill", "s3_faults", "corrupt_file",
          "deleted_file", "bad_rows", "poison_rows", "oom_rows", "two_drivers",
          *table_faults.TRIALS]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--faults", default=",".join(FAULTS))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import subprocess

    import ray

    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s3_url = f"http://127.0.0.1:{port}"
    options = {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": s3_url}}
    trials: list[harness.Trial] = []
    try:
        wait_http(s3_url)
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        for fault in args.faults.split(","):
            for seed in range(args.trials):
                with tempfile.TemporaryDirectory() as tmp:
                    started = time.monotonic()
                    fn = table_faults.TRIALS.get(fault) or getattr(
                        harness, fault if fault != "oom_rows" else "poison_rows")
                    rows = args.rows if fault != "bad_rows" else min(args.rows, 400)
                    if fault == "oom_rows":
                        trial = fn(Path(tmp), rows, seed, action="oom")
                    elif fault == "s3_faults":
                        trial = fn(Path(tmp), rows, seed, s3_url, options)
                    else:
                        trial = fn(Path(tmp), rows, seed)
                    trials.append(trial)
                    print(f"{fault:13s} seed={seed} {'ok ' if trial.completed else 'BAD'} "
                          f"exit={trial.exit_code} lost={trial.rows_lost} "
                          f"dup={trial.rows_duplicated} recomputed={trial.shards_recomputed}"
                          f"/{trial.recompute_bound} {trial.details} "
                          f"({time.monotonic() - started:.1f}s)", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        moto.terminate()
    print()
    print(harness.summarize(trials))
    return 0 if all(t.completed for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())

"""python -m pipeline.run JOB.yaml [PROFILE.yaml ...] [--set key=value ...] [--dry-run] [--fresh]
    [--wait]

Later files are merged over earlier ones: `python -m pipeline.run jobs/embed.yaml configs/cuda.yaml`.

Exit codes: 0 every shard committed; 1 some shards failed or the bad-row budget was
exceeded (the report lists them); 2 nothing ran (invalid job, input, model or output).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cli_common import run_cli
from pipeline.job import Start, run_spec
from pipeline.job_file import json_schema, load_spec
from pipeline.planning import describe_plan, plan_job
from pipeline.progress import Console


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", nargs="*", help="job file, then optional profiles (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a job key, e.g. workers.cpu.replicas=4")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="discard earlier output in output.uri and start over")
    parser.add_argument("--wait", action="store_true",
                        help="another driver holds the output: wait for it instead of exiting 2")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    parser.add_argument("--schema", action="store_true", help="print the job file JSON schema")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    def body() -> int:
        if args.schema:
            print(json.dumps(json_schema(), indent=2))
            return 0
        if not args.job:
            parser.error("a job file is required")
        spec = load_spec(args.job[0] if len(args.job) == 1 else args.job, args.overrides)
        if args.dry_run:
            print("\n".join(describe_plan(plan_job(spec))))
            return 0
        start = Start.FRESH if args.fresh else Start.CONTINUE
        return run_spec(spec, start, args.address, Console(show_progress=not args.no_progress),
                        wait=args.wait).exit_code

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())

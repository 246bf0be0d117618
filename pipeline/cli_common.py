"""Shared CLI behaviour: one clear line on known errors, a traceback only with --debug."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError, one_line


def run_cli(main: Callable[[], int], debug: bool) -> int:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return main()
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen environment problem: still one line
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {one_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1

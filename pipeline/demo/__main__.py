"""python -m pipeline.demo: write demo data sets.

    python -m pipeline.demo text --rows 20000 --out data/text
    python -m pipeline.demo tabular --rows 100000 --out data/tabular
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.demo.tabular import write_scoring_data
from pipeline.demo.text import write_text_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["text", "tabular"])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args(argv)
    if args.rows < 0 or args.files < 1:
        parser.error("--rows must be >= 0 and --files >= 1")
    if args.kind == "text":
        write_text_data(args.out, args.rows, files=args.files)
    else:
        write_scoring_data(args.out, args.rows, files=args.files)
    print(f"wrote {args.rows} {args.kind} rows to {args.out} in {args.files} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

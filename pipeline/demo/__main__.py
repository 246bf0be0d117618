"""python -m pipeline.demo: write demo data sets.

    python -m pipeline.demo text --rows 20000 --out data/text
    python -m pipeline.demo tabular --rows 100000 --out data/tabular
    python -m pipeline.demo images --rows 3000 --out data/images
    python -m pipeline.demo image-model --out models/image-src   (then: pipeline.models import)
    python -m pipeline.demo table --rows 20000 --out data/patients   (a Delta table)
    python -m pipeline.demo table-night --out data/patients   (appends and deletes a night's rows)
    python -m pipeline.demo prompts --rows 300 --out data/prompts   (for make generate)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.demo.images import write_image_data, write_image_model
from pipeline.demo.prompts import write_prompt_data
from pipeline.demo.tables import apply_night, write_table_data
from pipeline.demo.tabular import write_scoring_data
from pipeline.demo.text import write_text_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["text", "tabular", "images", "image-model", "table",
                                         "table-night", "prompts"])
    parser.add_argument("--rows", type=int, help="rows (image files for images)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args(argv)
    if args.kind == "image-model":
        write_image_model(args.out)
        print(f"wrote a demo image classifier (model.onnx, preprocessor_config.json) to {args.out}")
        return 0
    if args.kind == "table-night":
        print(f"{args.out}: {apply_night(args.out)}")
        return 0
    if args.rows is None:
        parser.error(f"{args.kind} needs --rows")
    if args.rows < 0 or args.files < 1:
        parser.error("--rows must be >= 0 and --files >= 1")
    if args.kind == "images":
        write_image_data(args.out, args.rows)
        print(f"wrote {args.rows} image files to {args.out}")
        return 0
    if args.kind == "table":
        write_table_data(args.out, args.rows)
        print(f"wrote a Delta table of {args.rows} rows to {args.out}")
        return 0
    if args.kind == "prompts":
        write_prompt_data(args.out, args.rows, files=min(args.files, 2))
        print(f"wrote {args.rows} prompts to {args.out}")
        return 0
    if args.kind == "text":
        write_text_data(args.out, args.rows, files=args.files)
    else:
        write_scoring_data(args.out, args.rows, files=args.files)
    print(f"wrote {args.rows} {args.kind} rows to {args.out} in {args.files} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

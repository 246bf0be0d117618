"""python -m pipeline.models: import, export, validate and inspect model bundles.

    python -m pipeline.models import SRC --out DIR [--task auto|embed|classify|rerank|
        token-classify|sparse-embed|tensor] [--model-file NAME.onnx] [--pooling mean|cls|max|sum]
        [--activation identity|sigmoid] [--features a,b,c] [--sample FILE.parquet]
        [--reference FILE.npz|.parquet] [--atol X] [--min-cosine X] [--strict]
    python -m pipeline.models export-bert SRC --out DIR [--no-pool-in-graph] [--pooling mean|cls]
    python -m pipeline.models export-demo-tabular --out DIR
    python -m pipeline.models validate BUNDLE [--no-smoke]
    python -m pipeline.models info BUNDLE [--json]   (sha256 of the model, identity of the bundle)
    python -m pipeline.models optimize BUNDLE --level fused|fp16|int8 --out DIR
        [--provider cpu|cuda] [--sample FILE.parquet] [--rows N] [--min-cosine X] [--max-prob-error X]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.accuracy_gate import GateSettings, optimize_bundle
from pipeline.cli_common import run_cli
from pipeline.demo.tabular import export_tabular_bundle
from pipeline.errors import ConfigError
from pipeline.import_checks import read_sample, reference_check, sample_feeds
from pipeline.models.bert_export import export_bert
from pipeline.models.bundle import fetch_bundle, local_identity, read_bundle_spec
from pipeline.models.importing import ImportOptions, import_model
from pipeline.models.info import bundle_info
from pipeline.models.interpret import Choices
from pipeline.models.optimize import LEVELS
from pipeline.models.validate import validate_bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="a converter's model (.onnx file, sentence-transformers "
                         "or Optimum folder) -> a bundle, every value inferred and checked")
    _import_arguments(imp)

    exp = sub.add_parser("export-bert", help="BERT-family checkpoint -> embed bundle (no PyTorch)")
    exp.add_argument("src", help="checkpoint directory or installed package holding one")
    exp.add_argument("--out", required=True, type=Path)
    exp.add_argument("--no-pool-in-graph", action="store_true",
                     help="output token vectors; the embed task pools them instead")
    exp.add_argument("--pooling", choices=["mean", "cls"], help="default: from modules.json")
    norm = exp.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None)
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    exp.add_argument("--max-length", type=int, help="default: sentence_bert_config.json")

    tab = sub.add_parser("export-demo-tabular", help="train the breast-cancer demo classifier")
    tab.add_argument("--out", required=True, type=Path)

    val = sub.add_parser("validate", help="check a bundle against the installed onnxruntime")
    val.add_argument("bundle")
    val.add_argument("--no-smoke", action="store_true", help="skip the smoke runs")

    info = sub.add_parser("info", help="inputs, outputs, opsets, size, sha256, identity, task")
    info.add_argument("bundle")
    info.add_argument("--json", action="store_true")
    _optimize_parser(sub)
    return parser


def _optimize_parser(sub: argparse._SubParsersAction) -> None:
    default = GateSettings()
    opt = sub.add_parser("optimize", help="a fused, fp16 or int8 copy of a bundle, written only "
                         "if it matches the source on a sample (the accuracy gate)")
    opt.add_argument("bundle")
    opt.add_argument("--level", required=True, choices=LEVELS)
    opt.add_argument("--out", required=True, type=Path)
    opt.add_argument("--provider", choices=["cpu", "cuda"], default=default.provider,
                     help="where the gate runs the new model (fp16 is meant for cuda)")
    opt.add_argument("--sample", type=Path, help="Parquet file with the task's input columns "
                     "(default for text bundles: demo texts; required for feature bundles)")
    opt.add_argument("--rows", type=int, default=default.rows, help="demo texts in the sample")
    opt.add_argument("--min-cosine", type=float, default=default.min_cosine,
                     help="embeddings: lowest cosine to the source on any row")
    opt.add_argument("--max-prob-error", type=float, default=default.max_prob_error,
                     help="classifiers: largest absolute probability difference")



def _import_arguments(imp: argparse.ArgumentParser) -> None:
    """The import command's arguments."""
    imp.add_argument("src", help=".onnx file or folder, local or any fsspec URL")
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--task", default="auto",
                     choices=["auto", "embed", "classify", "rerank", "token-classify",
                              "sparse-embed", "detect", "zero-shot", "generate", "tensor"])
    imp.add_argument("--model-file", help="the .onnx file of a folder holding several "
                     "(model_quantized.onnx beside model.onnx): default model.onnx")
    imp.add_argument("--pooling", choices=["mean", "cls", "max", "sum"],
                     help="token embeddings: mean or cls (default: 1_Pooling/config.json); "
                     "sparse-embed: max or sum (default: 1_SpladePooling/config.json)")
    imp.add_argument("--activation", choices=["identity", "sigmoid"],
                     help="rerank: the score of a one-logit model (default: what the "
                     "sentence-transformers config names, else the raw logit)")
    imp.add_argument("--features", help="feature names in the model's order, comma-separated")
    imp.add_argument("--sample", type=Path, help="Parquet rows to check batches (and compare "
                     "with --reference) on; default: synthesized rows")
    imp.add_argument("--reference", type=Path, help="outputs the source framework computed for "
                     "--sample (.npz or Parquet, by output column); a mismatch fails the import")
    imp.add_argument("--atol", type=float, default=1e-4, help="--reference: largest difference")
    imp.add_argument("--min-cosine", type=float, default=0.9999,
                     help="--reference: lowest cosine of an embedding to its reference")
    imp.add_argument("--strict", action="store_true",
                     help="refuse a graph that only runs one row per call")

def _import(args: argparse.Namespace) -> int:
    if args.reference and not args.sample:
        raise ConfigError("--reference: needs --sample (the rows the reference was computed on)")
    sample = read_sample(args.sample) if args.sample else None
    choices = Choices(task=args.task, pooling=args.pooling, activation=args.activation,
                      model_file=args.model_file,
                      features=[f.strip() for f in args.features.split(",")] if args.features
                      else None)
    options = ImportOptions(
        choices=choices, strict=args.strict,
        feeds=sample_feeds(sample, f"--sample {args.sample}") if sample is not None else None,
        verify=reference_check(sample, args.reference, args.atol, args.min_cosine)
        if args.reference else None)
    done = import_model(args.src, args.out, options)
    spec = done.bundle.spec
    print(f"wrote {args.out} (task {spec.task}, sha256 {spec.sha256[:12]}…, identity "
          f"{done.bundle.identity[:12]}…)")
    for finding in done.reading.findings:
        value = finding.value if not isinstance(finding.value, list) or len(finding.value) < 6 \
            else f"{finding.value[:3]} … ({len(finding.value)})"
        print(f"  {finding.key:24s} {value!s:32s} from {finding.source}")
    for repair in done.repairs:
        print(f"  repaired: {repair}")
    for warning in done.warnings:
        print(f"  warning: {warning}")
    if args.reference:
        print(f"  reference: every row of {args.sample.name} matches {args.reference.name}")
    return 0


def _export_bert(args: argparse.Namespace) -> int:
    spec = export_bert(args.src, args.out, pool_in_graph=not args.no_pool_in_graph,
                       pooling=args.pooling, normalize=args.normalize,
                       max_length=args.max_length)
    print(f"wrote {args.out} (task {spec.task}, sha256 {spec.sha256[:12]}…, "
          f"identity {_identity(args.out)[:12]}…)")
    return 0


def _export_tabular(args: argparse.Namespace) -> int:
    spec = export_tabular_bundle(args.out)
    print(f"wrote {args.out} (task {spec.task}, {len(spec.features or [])} features, "
          f"identity {_identity(args.out)[:12]}…)")
    return 0


def _identity(out: Path) -> str:
    return local_identity(out, read_bundle_spec(str(out)))  # just written: the model is ours


def _validate(args: argparse.Namespace) -> int:
    report = validate_bundle(fetch_bundle(args.bundle), smoke=not args.no_smoke,
                             batches=not args.no_smoke)
    print(f"{args.bundle}: valid (IR {report.ir_version}, opset {report.opset})")
    if report.batches:
        print(f"  batches   {report.batches}")
    for check in report.providers:
        print(f"  {check.provider:9s} {'loads' if check.loaded else 'unavailable'}: {check.detail}")
    return 0


def _info(args: argparse.Namespace) -> int:
    info = bundle_info(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"bundle   {info['uri']}")
    print(f"task     {info['task']}")
    print(f"sha256   {info['sha256']}")
    print(f"identity {info['identity']}")
    print(f"size     {info['size_bytes'] / 1e6:.1f} MB")
    print(f"ir       {info['ir_version']}   opsets {info['opsets']}")
    for kind in ("inputs", "outputs"):
        print(kind)
        for item in info[kind]:
            extra = f"  <- {item['source']}" if item.get("source") else ""
            extra += f"  (role {item['role']})" if item.get("role") else ""
            print(f"  {item['name']:22s} {item['type']:16s} {item['shape']}{extra}")
    return 0


def _optimize(args: argparse.Namespace) -> int:
    if args.rows < 1:
        raise ConfigError(f"--rows: {args.rows}; use 1 or more")
    gate = GateSettings(provider=args.provider, sample=args.sample, rows=args.rows,
                        min_cosine=args.min_cosine, max_prob_error=args.max_prob_error)
    done = optimize_bundle(args.bundle, args.out, args.level, gate)
    print(f"wrote {done.path} ({args.level}: {done.gate.describe()}; "
          f"{done.size_bytes / 1e6:.1f} MB, sha256 {done.spec.sha256[:12]}…)")
    if done.fusions:
        print("  fused: " + ", ".join(f"{op} {n}" for op, n in done.fusions.items()))
    note = done.spec.source["optimization"]["gate"].get("note")
    if note:
        print(f"  note: {note}")
    return 0


COMMANDS = {"import": _import, "export-bert": _export_bert, "export-demo-tabular": _export_tabular,
            "validate": _validate, "info": _info, "optimize": _optimize}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: COMMANDS[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

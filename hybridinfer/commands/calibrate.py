"""Calibrate sparsity thresholds for a model without exact zeros: CETT (FFN neurons) or TEAL (matrix inputs).

Runs the model densely over up to --tokens tokens of the texts (chunks of -c tokens, progress bar),
then chooses the thresholds that meet --ppl-increase P (the perplexity of those chunks, computed as
the sparse mode computes it, at most P% above dense) or --sparsity S (the mean share of neurons or
inputs dropped), and writes them with the model's fingerprint to DIR. Prints the per-layer table and
the calibration text's perplexity before and after. Use them with --sparse exact / predicted
--thresholds DIR (CETT; tools/train_predictor.py --thresholds DIR trains the predictor) or --sparse
input --thresholds DIR (TEAL).
"""

import argparse
import json
import sys
from pathlib import Path

from hybridinfer.calibrate import calibrate_cett, calibrate_teal
from hybridinfer.commands.common import add_model_arguments, float_in, int_at_least, load_session
from hybridinfer.errors import HybridInferError
from hybridinfer.loader import model_fingerprint
from hybridinfer.predictors import PredictorError
from hybridinfer.predictors.collect import plan
from hybridinfer.predictors.thresholds import METHODS, save

DEFAULT_TOKENS = 8192


def sparsity_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is out of range [0, 1): the share of neurons or inputs dropped")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, 512, "tokens per calibration chunk (default: 512)", sparse_options=False)
    parser.add_argument("--data", type=Path, nargs="+", required=True, metavar="TEXT", help="calibration text files")
    parser.add_argument("--method", choices=METHODS, required=True,
                        help="cett: per-layer thresholds on FFN neurons' contributions (ProSparse, Sparsing Law); "
                             "teal: per-matrix thresholds on input magnitudes (TEAL)")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--ppl-increase", type=float_in(0.0, 1000.0, low_open=True), metavar="P",
                      help="the sparsest thresholds whose calibration perplexity is at most P%% above dense")
    goal.add_argument("--sparsity", type=sparsity_arg, metavar="S",
                      help="thresholds that drop this share of FFN neurons (cett) or matrix inputs (teal), in [0, 1)")
    parser.add_argument("--tokens", type=int_at_least(2), default=DEFAULT_TOKENS,
                        help=f"calibration tokens, spread over the files (default: {DEFAULT_TOKENS})")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="thresholds directory to write")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.output.is_dir():  # before the work, not after it
        raise HybridInferError(f"-o '{args.output}' is a file: give a directory for the thresholds")
    if args.ctx_size < 3:
        raise HybridInferError(f"-c {args.ctx_size} is too small to score a chunk: give at least 3")
    s = load_session(args)
    p = plan(s.tokenizer, args.data, args.tokens, s.model.n_ctx)
    fp = model_fingerprint(s.gguf, s.model.args)
    calibrate = calibrate_cett if args.method == "cett" else calibrate_teal
    th, summary = calibrate(s.model, p, fp, args.ppl_increase, args.sparsity, progress=not args.json)
    th.info["request"] = {"model": s.gguf.path.name, "texts": [str(t) for t in args.data], "tokens": args.tokens,
                          "n_ctx": s.model.n_ctx, "ppl_increase": args.ppl_increase, "sparsity": args.sparsity}
    try:
        save(args.output, th)
    except PredictorError as e:
        raise HybridInferError(str(e)) from None
    if args.json:
        print(json.dumps(summary))
        return 0
    print(markdown(summary))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def markdown(summary: dict) -> str:
    """The per-layer table and the calibration perplexity before and after."""
    rows = summary["layers"]
    names = [k for k in rows[0] if k != "layer"]
    lines = ["| layer | " + " | ".join(n.replace("_", " ") for n in names) + " |", "|---:|" + "---:|" * len(names)]
    lines += [f"| {r['layer']} | " + " | ".join(f"{r[n]:.4g}" for n in names) + " |" for r in rows]
    lines.append(f"\n{summary['method']}: sparsity {summary['sparsity']:.4f} over the calibration tokens; perplexity "
                 f"of the calibration text {summary['calibration_ppl_dense']:.4f} dense, "
                 f"{summary['calibration_ppl']:.4f} sparse "
                 f"({100 * (summary['calibration_ppl'] / summary['calibration_ppl_dense'] - 1):+.2f}%)")
    return "\n".join(lines)

"""Profile how often each FFN neuron fires: per layer, per neuron, over text (the hot/cold statistics).

Runs the model densely over up to --tokens tokens of the texts, in chunks of -c tokens, counting for
each neuron the tokens for which it is truly active (activation != 0), and writes the counts with the
number of tokens and the model's fingerprint to STATS (safetensors). Prints, per layer, the tokens
seen, the mean true sparsity and the share of neurons, hottest first, that carries 50% / 80% / 95% of
the activations; --plot draws those curves (needs matplotlib: pip install 'hybridinfer[plot]').
"""

import argparse
import json
import sys
from pathlib import Path

from hybridinfer.commands.common import add_model_arguments, check_plot, int_at_least, load_session
from hybridinfer.errors import HybridInferError
from hybridinfer.loader import model_fingerprint
from hybridinfer.predictors.activity import StatsError, plot
from hybridinfer.predictors.collect import profile

DEFAULT_TOKENS = 16384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, 0, "tokens per chunk (default: 0 = the model's context, at most 4096)",
                        sparse_options=False)
    parser.add_argument("--data", type=Path, nargs="+", required=True, metavar="TEXT", help="text files to profile on")
    parser.add_argument("--tokens", type=int_at_least(2), default=DEFAULT_TOKENS,
                        help=f"tokens to profile, spread over the files (default: {DEFAULT_TOKENS})")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="STATS", help="statistics file to write")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the per-layer curves into this image")
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.output.is_dir():  # before the work, not after it
        raise HybridInferError(f"-o '{args.output}' is a directory: give the statistics file's name")
    check_plot(args.plot)
    s = load_session(args)
    if not s.model.args.ffn_act.sparse:  # before reading the texts, which may be large
        raise HybridInferError(f"the model's FFN activation is {s.model.args.ffn_act}, which leaves no exact zeros "
                               f"to count: pass --ffn-act relu or fatrelu:T if it was trained so")
    stats = profile(s.model, s.tokenizer, args.data, args.tokens, model_fingerprint(s.gguf, s.model.args),
                    progress=not args.json)
    try:
        stats.save(args.output)
        if args.plot is not None:
            plot(stats, args.plot, f"{s.gguf.path.name}: {stats.tokens} tokens profiled")
    except StatsError as e:  # either file unwritable included
        raise HybridInferError(str(e)) from None
    if args.json:
        print(json.dumps({"tokens": stats.tokens, "layers": stats.rows()}))
    else:
        print(stats.markdown())
        print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0

"""Convert a GGUF once into a sparse GGUF: the layout predicted decoding reads, mapped at load, no copies.

Writes OUT with the model's tensors, each layer's gate and up rows interleaved and ffn_down
neuron-major in place of ffn_gate, ffn_up and ffn_down (the re-quantisation of ffn_down done here,
once), the predictor (--predictor; the default model's own for the default model) in the type it
runs in (--predictor-type), and with --profile each layer's neurons stored hottest first with the
profile itself, so that --vram-budget needs no --profile. `run`, `perplexity` and `bench` take OUT
like any GGUF: predicted mode with the file's predictor by default.
"""

import argparse
import sys
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from hybridinfer import sparse_gguf
from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR
from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import ModelArgs, model_fingerprint
from hybridinfer.predictors import PredictorError, activity, load
from hybridinfer.predictors.collect import progress_bar
from hybridinfer.predictors.mlp import DEFAULT_QTYPE, PREDICTOR_QTYPES

DOWN_TYPES = {t.name.lower(): t for t in (Q.F16, Q.Q8_0, Q.Q4_1, Q.Q4_0)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", type=Path, help=f"GGUF file (default: {DEFAULT_MODEL.name}, shipped)")
    parser.add_argument("--predictor", type=Path, metavar="DIR",
                        help="predictor to embed (ours or PowerInfer's); the default model's own for it")
    parser.add_argument("--predictor-type", choices=list(PREDICTOR_QTYPES), default=DEFAULT_QTYPE,
                        help=f"the embedded predictor's weight type (default: {DEFAULT_QTYPE})")
    parser.add_argument("--down-type", choices=list(DOWN_TYPES), type=str.lower,
                        help="the neuron-major ffn_down's type (default: the model's for f32/f16/bf16/q8_0 files, "
                             "else q8_0); q4_0 reads about half the bytes of q8_0 when decoding, at the cost of a "
                             "second 4-bit rounding of a quantised file's ffn_down (an f16 file's is rounded once)")
    parser.add_argument("--profile", type=Path, metavar="STATS",
                        help="activation statistics: store each layer's neurons hottest first, with the profile")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.gguf", help="sparse GGUF to write")


def main(args: argparse.Namespace) -> int:
    src = args.model or DEFAULT_MODEL
    if args.output.resolve() == src.resolve():
        raise HybridInferError(f"the output '{args.output}' is the input: give another path")
    gguf = GGUFFile(src)
    margs = ModelArgs.from_metadata(gguf.metadata)
    fp = model_fingerprint(gguf, margs)
    predictor_dir = args.predictor or (DEFAULT_PREDICTOR if src == DEFAULT_MODEL else None)
    try:
        weights = load(predictor_dir, fp) if predictor_dir else None
        stats = activity.load(args.profile, fp) if args.profile else None
    except PredictorError as e:
        raise HybridInferError(str(e)) from None
    bar = lambda layers: progress_bar(layers, desc="converting", unit="layer")  # noqa: E731
    summary = sparse_gguf.convert(src, args.output, weights, args.predictor_type, stats, bar,
                                  DOWN_TYPES[args.down_type] if args.down_type else None)
    what = ["gate/up interleaved", f"ffn_down neuron-major ({summary.down})"]
    if summary.predictor:
        what.append(f"predictor ({summary.predictor})")
    if summary.permuted:
        what.append("neurons hottest first, with the profile")
    print(f"wrote {summary.path}: {summary.nbytes / 2**20:.1f} MiB, {summary.layers} layers ({', '.join(what)})",
          file=sys.stderr)
    return 0

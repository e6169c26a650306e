#!/usr/bin/env python3
"""Train the activation predictors of a ReLU llama model (or any, for CETT thresholds): collect, train, calibrate, validate, write.

    python tools/train_predictor.py MODEL.gguf --data TEXT [TEXT ...] -o DIR

Runs the engine over the text (chunks of the model's context) recording each layer's FFN input and
true active set on disk, trains one fc1 -> ReLU -> fc2 MLP per layer with torch, sets each layer's
threshold on held-out chunks for --target-recall, keeps the epoch with the highest predicted
sparsity there, and writes DIR (config.json + predictor.safetensors). The per-layer table printed
at the end (and stored in config.json) is measured on further held-out chunks of the same texts.
Train on other text than you evaluate on, and on the model's own training distribution: on text
unlike the training text recall comes out lower (tiny-relu-llama: trained on Shakespeare and
WikiText, 0.95 on held-out chunks gave 0.89 on its Bible validation text). Even then leave a margin
with --target-recall: its shipped predictor, trained on its own KJV and Shakespeare, uses 0.99,
which gives 0.976 on its validation text, where 0.97 gives 0.941.
"""

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from hybridinfer.cli import OneLineParser
from hybridinfer.commands.common import ffn_act_arg, float_in, int_at_least

try:
    from hybridinfer.predictors.train import TrainOptions
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    sys.exit("error: training predictors needs torch: pip install 'torch>=2.4' (the CPU build is enough)")

DEFAULTS = TrainOptions()
DEFAULT_TOKENS = 131072


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"'{text}' is not a readable file")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_predictor.py", description=__doc__.splitlines()[1],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 4)[4])
    p.add_argument("model", type=_existing_file,
                   help="GGUF model with a ReLU, dReLU or FATReLU FFN, or any with --thresholds")
    p.add_argument("--data", type=_existing_file, nargs="+", required=True, metavar="TEXT",
                   help="UTF-8 text files to run the model over (the budget is split evenly between them)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="predictor directory to write")
    p.add_argument("--rank", type=int_at_least(1), default=DEFAULTS.rank,
                   help=f"hidden size of each layer's MLP, 1..n_ff (default: {DEFAULTS.rank})")
    p.add_argument("--tokens", type=int_at_least(2), default=DEFAULT_TOKENS,
                   help=f"tokens to collect, training and held-out together (default: {DEFAULT_TOKENS})")
    p.add_argument("--epochs", type=int_at_least(1), default=DEFAULTS.epochs,
                   help=f"passes over the training tokens (default: {DEFAULTS.epochs})")
    p.add_argument("--seed", type=int_at_least(0), default=DEFAULTS.seed, help=f"(default: {DEFAULTS.seed})")
    p.add_argument("--target-recall", type=float_in(0.0, 1.0, low_open=True), default=DEFAULTS.target_recall,
                   help=f"recall each layer's threshold is set to reach on held-out chunks "
                        f"(default: {DEFAULTS.target_recall})")
    p.add_argument("--thresholds", type=Path, metavar="DIR",
                   help="CETT thresholds (hybridinfer calibrate --method cett): train for the sets they define, "
                        "on any activation (SiLU included)")
    p.add_argument("--ffn-act", type=ffn_act_arg, metavar="relu|drelu|fatrelu:T",
                   help="FFN activation, overriding the file's hybridinfer.ffn_activation")
    p.add_argument("-c", "--ctx-size", type=int_at_least(2),
                   help="tokens per chunk (default: the model's training context, at most 512)")
    p.add_argument("-t", "--threads", type=int_at_least(1), default=1,
                   help="threads for the engine and torch (default: 1; on a busy shared machine more threads "
                        "wait on each other at every barrier and run several times slower)")
    p.add_argument("--batch-size", type=int_at_least(1), default=DEFAULTS.batch_size,
                   help=f"(default: {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float_in(0.0, 1.0, low_open=True), default=DEFAULTS.lr,
                   help=f"AdamW learning rate (default: {DEFAULTS.lr})")
    p.add_argument("--work-dir", type=Path,
                   help="where recorded activations go, kept, and reused by a later run with the same model, "
                        "texts, --tokens and -c; default: a temporary directory, removed after")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from hybridinfer import kernels
    from hybridinfer.errors import HybridInferError
    from hybridinfer.gguf_file import GGUFFile
    from hybridinfer.loader import ModelArgs
    from hybridinfer.model import load_model
    from hybridinfer.tokenizer import Tokenizer
    from hybridinfer.loader import model_fingerprint
    from hybridinfer.predictors.collect import Collection, collect
    from hybridinfer.predictors.format import PredictorError, save
    from hybridinfer.predictors.thresholds import load as load_thresholds
    from hybridinfer.predictors.train import split_chunks, train

    start = time.perf_counter()
    try:
        try:
            kernels.set_threads(args.threads)
        except ValueError as e:
            parser.error(f"-t {args.threads}: {e}")
        a = ModelArgs.from_metadata(GGUFFile(args.model).metadata, args.ffn_act)
        if args.ctx_size and args.ctx_size > a.n_ctx_train:
            parser.error(f"-c {args.ctx_size} is out of range: the model was trained for at most {a.n_ctx_train}")
        gguf, model = load_model(args.model, args.ctx_size or min(a.n_ctx_train, 512), args.ffn_act)
        fp = model_fingerprint(gguf, a)
        cett = load_thresholds(args.thresholds, fp) if args.thresholds else None
        if cett is not None and cett.method != "cett":
            parser.error(f"--thresholds '{args.thresholds}' holds {cett.method} thresholds, which define no FFN "
                         f"active set: give CETT ones (hybridinfer calibrate --method cett)")
        if not a.ffn_act.sparse and cett is None:
            parser.error(f"the model's FFN activation is {a.ffn_act}, which leaves no exact zeros to predict: "
                         f"give a ReLU model, --ffn-act relu / drelu / fatrelu:T, or CETT --thresholds DIR")
        if args.rank > a.n_ff:
            parser.error(f"--rank {args.rank} is out of range: the model has n_ff = {a.n_ff}")
        tokenizer = Tokenizer.from_metadata(gguf.metadata)
        opts = TrainOptions(rank=args.rank, epochs=args.epochs, seed=args.seed, target_recall=args.target_recall,
                            batch_size=args.batch_size, lr=args.lr, progress=not args.quiet)
        with tempfile.TemporaryDirectory(prefix="hybridinfer-collect-") as tmp:
            work = args.work_dir or Path(tmp)
            stat = Path(args.model).stat()
            model_id = f"{Path(args.model).resolve()}:{stat.st_size}:{stat.st_mtime}"
            col = collect(model, tokenizer, args.data, args.tokens, work, not args.quiet, model_id, cett)
            collect_s = time.perf_counter() - start
            try:
                split_chunks(len(col.chunks), args.seed)
            except ValueError as e:
                parser.error(f"--tokens {args.tokens}: {e}")
            weights, stats, info = train(Collection.open(work), fp, opts, args.threads)
        total_s = time.perf_counter() - start
        info["training"].update({"model": Path(args.model).name, "ffn_act": str(a.ffn_act),
                                 "thresholds": str(args.thresholds) if cett else None, "threads": args.threads,
                                 "collect_seconds": round(collect_s, 1), "seconds": round(total_s, 1),
                                 "train_seconds": info["training"]["seconds"],
                                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        weights.info = info
        save(args.output, weights)
    except (HybridInferError, PredictorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    t = info["training"]
    print(f"\nValidation on {t['validation_tokens']} held-out tokens (calibrated for recall "
          f"{args.target_recall} on {t['calibration_tokens']} other held-out tokens; trained on "
          f"{t['train_tokens']}):\n")
    print(stats.markdown())
    size = sum(w.nbytes for w in weights.fc1 + weights.fc2)
    print(f"\nwrote {args.output} (rank {args.rank}, {size / 2**20:.2f} MiB F16) in {total_s:.1f} s "
          f"(collect {collect_s:.1f} s, train {t['train_seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

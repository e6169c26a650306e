"""Perplexity of a text file, computed as llama.cpp's llama-perplexity does.

The text is cut into chunks of -c tokens, each evaluated from an empty cache and scored on its
second half; prints `PPL = x +/- y`.
"""

import argparse
import json
import sys
from pathlib import Path

from hybridinfer.commands.common import add_model_arguments, int_at_least, load_session
from hybridinfer.errors import HybridInferError
from hybridinfer.perplexity import perplexity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, 512, "tokens per chunk (default: 512)")
    parser.add_argument("-f", "--file", type=Path, required=True, help="text file to score")
    parser.add_argument("--chunks", type=int_at_least(-1), default=-1, help="chunks to score, -1 for all")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HybridInferError(f"cannot read text file '{args.file}': {getattr(e, 'strerror', None) or e}") from None
    text = text.removesuffix("\n")  # as llama.cpp reads -f
    if args.ctx_size < 3:  # a chunk scores the tokens after its first half, but for its last
        raise HybridInferError(f"-c {args.ctx_size} is too small to score a chunk: give at least 3")
    if args.chunks == 0:
        raise HybridInferError("--chunks 0 scores nothing: give -1 for every chunk or a count of at least 1")
    s = load_session(args)
    tokens = s.tokenizer.encode(text, add_special=True)
    progress = None if args.json else (lambda i, ppl: print(f"[{i + 1}]{ppl:.4f},", end=" ", file=sys.stderr, flush=True))
    result = perplexity(s.model, tokens, s.tokenizer.bos_id if s.tokenizer.add_bos else None, args.chunks,
                        progress or (lambda i, ppl: None))
    if args.json:
        print(json.dumps({"ppl": result.ppl, "err": result.err, "n_ctx": result.n_ctx,
                          "n_chunks": len(result.chunk_nll), "chunk_nll": result.chunk_nll,
                          "n_tokens": len(tokens)}))
    else:
        print(file=sys.stderr)
        print(f"PPL = {result.ppl:.4f} +/- {result.err:.5f}")
    return 0

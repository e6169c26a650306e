"""What a predictor costs in quality: perplexity with every FFN restricted to the predicted neurons.

MaskedFFN is the plain reference of predicted-sparsity inference: it computes the whole FFN densely,
then zeroes act(gate) * up outside the predicted set P before the down projection, so its output is
what a predicted-sparse FFN must produce; it also counts true and predicted sets for the table.
It is for measuring quality, not speed.

    python -m hybridinfer.predictors.evaluate MODEL.gguf DIR -f TEXT [-c 256]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import activate
from hybridinfer.loader import ModelArgs
from hybridinfer.model import load_model
from hybridinfer.perplexity import perplexity
from hybridinfer.tokenizer import Tokenizer
from hybridinfer.ffn import ActiveSet
from hybridinfer.loader import model_fingerprint
from hybridinfer.predictors.format import PredictorError
from hybridinfer.predictors.mlp import DEFAULT_QTYPE, PREDICTOR_QTYPES, PredictorSet
from hybridinfer.predictors.stats import SparsityStats


class MaskedFFN:
    """down((act(gate) * up) restricted to P) for P from predictors; stats count A and P per layer."""

    def __init__(self, args: ModelArgs, predictors: PredictorSet, n_batch: int):
        self.act, self.predictors = args.ffn_act, predictors
        self.active = ActiveSet(args.ffn_act)
        self.gate = np.zeros((n_batch, args.n_ff), np.float32)
        self.up = np.zeros((n_batch, args.n_ff), np.float32)
        self.true = np.zeros((n_batch, args.n_ff), bool)
        self.pred = np.zeros((n_batch, args.n_ff), bool)
        self.stats = SparsityStats(args.n_layer, args.n_ff)

    def __call__(self, layer, blk, resid, xn, out) -> None:
        T = len(xn)
        gate, up, true, pred = self.gate[:T], self.up[:T], self.true[:T], self.pred[:T]
        blk.ffn_gate(xn, gate)
        blk.ffn_up(xn, up)
        self.active.mask(layer, gate, up, true)
        self.predictors.predict_mask(layer, resid, pred)
        activate(self.act, gate, up)
        gate *= pred
        blk.ffn_down(gate, out)
        self.stats.add(layer, true, pred)


def evaluate(model_path: Path, predictor_dir: Path, text_path: Path, n_ctx: int, n_chunks: int = -1,
             qtype: str = DEFAULT_QTYPE) -> dict:
    """Dense and predicted perplexity of text_path, and the predicted run's sparsity table, the predictor
    run with its weights as qtype (PREDICTOR_QTYPES)."""
    gguf, model = load_model(model_path, n_ctx)
    tok = Tokenizer.from_metadata(gguf.metadata)
    tokens = tok.encode(text_path.read_text(encoding="utf-8").removesuffix("\n"), add_special=True)
    bos = tok.bos_id if tok.add_bos else None
    t = time.perf_counter()
    dense = perplexity(model, tokens, bos, n_chunks)
    dense_s = time.perf_counter() - t
    predictors = PredictorSet.load(predictor_dir, model_fingerprint(gguf, model.args), qtype, n_batch=model.n_batch)
    inner, model.ffn = model.ffn, MaskedFFN(model.args, predictors, model.n_batch)
    masked = model.ffn
    t = time.perf_counter()
    pred = perplexity(model, tokens, bos, n_chunks)
    pred_s = time.perf_counter() - t
    model.ffn = inner
    return {"text": str(text_path), "n_ctx": n_ctx, "chunks": len(dense.chunk_nll),
            "dense_ppl": dense.ppl, "predicted_ppl": pred.ppl, "ppl_rise": pred.ppl / dense.ppl - 1.0,
            "dense_s": dense_s, "predicted_s": pred_s, "stats": masked.stats}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hybridinfer.predictors.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("predictor", type=Path, help="predictor directory")
    p.add_argument("-f", "--file", type=Path, required=True, help="text to score (not the training text)")
    p.add_argument("-c", "--ctx-size", type=int, default=256)
    p.add_argument("--chunks", type=int, default=-1)
    p.add_argument("--predictor-type", choices=list(PREDICTOR_QTYPES), default=DEFAULT_QTYPE)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        r = evaluate(args.model, args.predictor, args.file, args.ctx_size, args.chunks, args.predictor_type)
    except (HybridInferError, PredictorError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stats = r.pop("stats")
    if args.json:
        print(json.dumps({**r, "table": stats.as_dict()}))
        return 0
    print(stats.markdown())
    print(f"\nperplexity on {r['text']} ({r['chunks']} chunks of {r['n_ctx']}): dense {r['dense_ppl']:.4f}, "
          f"predicted {r['predicted_ppl']:.4f} ({100 * r['ppl_rise']:+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

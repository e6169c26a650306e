"""Measure activation sparsity against perplexity (Sparsing Law's tool): top-k, FATReLU thresholds, CETT targets.

Runs the model over the chunks of -f TEXT (as perplexity does) once densely and once per setting of a
sweep, each setting zeroing FFN activations a = act(gate) * up by one rule: top-k (the k largest |a_i|
of each token and layer), FATReLU-style thresholds (|a_i| below t, one t for every layer), and CETT
targets (ProSparse / Sparsing Law: each layer's neurons whose contribution |a_i| * ||down[:, i]|| is
under the threshold that gives that CETT on the text; a PPL-p% point is the target whose perplexity
is p% above dense). Prints, per setting, the mean activation ratio (the share of neurons kept), the
perplexity and its ratio to dense, and the per-layer activation ratios; --thresholds DIR adds the
calibrated setting (hybridinfer calibrate: CETT, or TEAL's input sparsity); --plot FILE.png draws
perplexity ratio against sparsity, a line per method (needs matplotlib: pip install 'hybridinfer[plot]').
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hybridinfer.calibrate import cett_curve, cett_thresholds, down_norms, record_activations
from hybridinfer.commands.common import add_model_arguments, check_plot, int_at_least, load_session
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import DenseFFN, activate
from hybridinfer.inputs import InputSparseFFN, InputSparsity
from hybridinfer.loader import model_fingerprint
from hybridinfer.perplexity import perplexity
from hybridinfer.predictors import PredictorError
from hybridinfer.predictors.activity import pyplot
from hybridinfer.predictors.collect import Chunk, Plan, progress_bar
from hybridinfer.predictors.thresholds import load as load_thresholds

TOP_K = (0.7, 0.5, 0.35, 0.25, 0.15)  # shares of neurons kept
FAT = (0.005, 0.01, 0.02, 0.04, 0.08)  # |a| thresholds
CETT = (0.02, 0.05, 0.1, 0.2, 0.3)  # CETT targets


class RuleFFN(DenseFFN):
    """Dense gate and up; the activations rule(layer, a) keeps (bool [T, n_ff]); the kept share counted per layer."""

    def __init__(self, args, n_batch: int, rule):
        super().__init__(args, n_batch)
        self.rule = rule
        self.kept = np.zeros(args.n_layer)
        self.seen = np.zeros(args.n_layer)

    def __call__(self, layer, blk, resid, xn, out) -> None:
        gate, up = self.gate[:len(xn)], self.up[:len(xn)]
        blk.ffn_gate(xn, gate)
        blk.ffn_up(xn, up)
        activate(self.act, gate, up)
        keep = self.rule(layer, gate)
        gate[~keep] = 0.0
        self.kept[layer] += np.count_nonzero(keep)
        self.seen[layer] += keep.size
        blk.ffn_down(gate, out)

    def ratios(self) -> np.ndarray:
        return self.kept / np.maximum(self.seen, 1)


def top_k(share: float, n_ff: int):
    k = max(1, round(share * n_ff))

    def rule(layer, a):
        kth = -np.partition(-np.abs(a), k - 1, axis=1)[:, k - 1:k]
        return np.abs(a) >= kth
    return rule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, 512, "tokens per chunk (default: 512)", sparse_options=False)
    parser.add_argument("-f", "--file", type=Path, required=True, help="text file to measure on")
    parser.add_argument("--chunks", type=int_at_least(1), default=4, help="chunks of -c tokens to score (default: 4)")
    parser.add_argument("--thresholds", dest="calibrated", type=Path, metavar="DIR", help="a calibrated setting to add (hybridinfer "
                                                                       "calibrate)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw perplexity ratio against sparsity")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text(encoding="utf-8").removesuffix("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise HybridInferError(f"cannot read text file '{args.file}': {getattr(e, 'strerror', None) or e}") from None
    if args.ctx_size < 3:
        raise HybridInferError(f"-c {args.ctx_size} is too small to score a chunk: give at least 3")
    check_plot(args.plot)
    s = load_session(args)
    model, a = s.model, s.model.args
    fp = model_fingerprint(s.gguf, a)
    try:
        calibrated = load_thresholds(args.calibrated, fp) if args.calibrated else None
    except PredictorError as e:
        raise HybridInferError(str(e)) from None
    tokens = s.tokenizer.encode(text, add_special=True)
    bos = s.tokenizer.bos_id if s.tokenizer.add_bos else None
    n_chunks = min(args.chunks, len(tokens) // model.n_ctx)
    if n_chunks < 1:
        raise HybridInferError(f"the text has {len(tokens)} tokens, fewer than one chunk of {model.n_ctx} (-c)")

    # CETT's per-layer thresholds come from the activations of the text's own chunks
    plan = Plan([tokens[1:] if bos is not None else tokens],
                [Chunk(0, i * model.n_ctx, i * model.n_ctx, model.n_ctx) for i in range(n_chunks)], bos)
    acts, _ = record_activations(model, plan, progress=not args.json)
    downs = [blk.ffn_down.values() for blk in model.w.blk]
    norms = [down_norms(d) for d in downs]
    curves = [cett_curve(x, d, n) for x, d, n in zip(acts, downs, norms)]
    settings = [("top-k", f"k = {share:g} n_ff", top_k(share, a.n_ff)) for share in TOP_K]
    settings += [("FATReLU threshold", f"|a| < {t:g} dropped", lambda layer, x, t=t: np.abs(x) >= t) for t in FAT]
    for c in CETT:
        tau = cett_thresholds(curves, norms, c, fp, {})
        settings.append(("CETT", f"CETT {c:g}", tau.keeps))
    if calibrated is not None and calibrated.method == "cett":
        settings.append(("calibrated", f"{args.calibrated}", calibrated.keeps))

    def ppl(ffn, inputs=None):
        model.ffn, model.inputs = ffn, inputs
        return perplexity(model, tokens, bos, n_chunks).ppl

    dense_ffn = model.ffn
    rows = []
    with progress_bar(total=len(settings) + 1 + (calibrated is not None and calibrated.method == "teal"),
                      desc="sweep", unit="setting", disable=args.json) as bar:
        dense = ppl(dense_ffn)
        rows.append({"method": "dense", "setting": "", "activation_ratio": 1.0, "ppl": dense,
                     "layers": [1.0] * a.n_layer})
        bar.update()
        for method, setting, rule in settings:
            ffn = RuleFFN(a, model.n_batch, rule)
            value = ppl(ffn)
            rows.append({"method": method, "setting": setting, "activation_ratio": float(ffn.ratios().mean()),
                         "ppl": value, "layers": [float(r) for r in ffn.ratios()]})
            bar.update()
        if calibrated is not None and calibrated.method == "teal":
            inputs = InputSparsity(model.w.blk, calibrated, model.n_batch, decode=False)
            ffn = InputSparseFFN(a, model.n_batch, inputs, counting=True)
            value = ppl(ffn, inputs)
            kept = 1.0 - inputs.sparsity()
            rows.append({"method": "TEAL (inputs)", "setting": str(args.calibrated),
                         "activation_ratio": float(kept.mean()), "ppl": value, "layers": kept.mean(axis=1).tolist()})
            bar.update()
    model.ffn, model.inputs = dense_ffn, None
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / dense
    if args.json:
        print(json.dumps({"n_ctx": model.n_ctx, "chunks": n_chunks, "rows": rows}))
    else:
        print(markdown(rows))
    if args.plot is not None:
        plot(rows, args.plot, f"{s.gguf.path.name}: {n_chunks} x {model.n_ctx} tokens of {args.file.name}")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| method | setting | activation ratio | sparsity | perplexity | vs dense |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['activation_ratio']:.4f} | "
                     f"{1 - r['activation_ratio']:.4f} | {r['ppl']:.4f} | {r['ppl_ratio']:.4f}x |")
    n_layer = len(rows[0]["layers"])
    lines += ["", "Activation ratio per layer (the share of FFN neurons kept; TEAL: of matrix inputs):", "",
              "| method | setting | " + " | ".join(str(i) for i in range(n_layer)) + " |",
              "| --- | --- |" + " ---: |" * n_layer]
    for r in rows[1:]:
        lines.append(f"| {r['method']} | {r['setting']} | " + " | ".join(f"{x:.2f}" for x in r["layers"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        points = sorted((1 - r["activation_ratio"], r["ppl_ratio"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="dense")
    ax.set_xlabel("FFN activation sparsity (share of neurons dropped; TEAL: of inputs)")
    ax.set_ylabel("perplexity / dense perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise HybridInferError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        plt.close(fig)

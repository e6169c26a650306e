"""Measure prompt processing (pp) and generation (tg) speed, llama-bench style.

Prints a markdown table of tokens/s (median of -r runs after a warm-up); with --vs-llamacpp the same
tests run on llama.cpp (llama-cpp-python, same file, same threads) in the same run, and with
--vs-dense on this engine's dense mode (same weights, --sparse off), the engines taking turns run by
run, each with a ratio column.
"""

import argparse
import json
import sys
from pathlib import Path

from hybridinfer.bench import hybridinfer_tests, llamacpp_tests, run_tests
from hybridinfer.commands.common import add_model_arguments, int_at_least, load_session
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import DenseFFN, PredictedFFN
from hybridinfer.predictors import PredictorSet
from hybridinfer.model import Transformer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, None, None)
    parser.add_argument("-p", "--n-prompt", type=int_at_least(0), default=512, help="prompt tokens (default: 512)")
    parser.add_argument("-n", "--n-gen", type=int_at_least(0), default=128, help="generated tokens (default: 128)")
    parser.add_argument("-r", "--repetitions", type=int_at_least(1), default=5, help="runs per test (default: 5)")
    parser.add_argument("--vs-llamacpp", nargs="?", const=True, metavar="GGUF",
                        help="run llama.cpp on the same file (or on GGUF: the file a sparse GGUF was converted "
                             "from, which llama.cpp reads) and compare")
    parser.add_argument("--vs-dense", action="store_true",
                        help="run this engine's dense mode (--sparse off) on the same weights and compare")
    parser.add_argument("--vs-predicted", action="store_true",
                        help="with --vram-budget: run predicted mode with no split (all on the CPU) and compare")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _dense(s) -> Transformer:
    """Dense mode on the session's weights; with a split, the same budget spent on whole layers from
    the first (attention where the side takes it, and every FFN neuron, all predicted active)."""
    m = s.model
    if not s.split:
        return Transformer(m.args, m.w, m.n_ctx, DenseFFN(m.args, m.n_batch))
    everyone = PredictorSet.all_active(m.args.n_layer, m.args.n_embd, m.args.n_ff)
    dense = s.split.model(m.args, m.w, m.n_ctx, everyone, whole_layers=True)
    layers = dense.ffn.placement
    print(f"dense mode with whole layers: {sum(len(h) > 0 for h in layers.hot)} layers on {s.split.device} "
          f"({layers.nbytes / 2**20:.1f} MiB)", file=sys.stderr)
    return dense


def main(args: argparse.Namespace) -> int:
    s = load_session(args, n_ctx=max(args.n_prompt, args.n_gen, 1))
    if args.vs_predicted and not s.placement:
        raise HybridInferError("--vs-predicted compares the split of --vram-budget with predicted mode: give "
                               "--vram-budget GiB")
    engine = "hybridinfer" if s.mode == "off" else f"hybridinfer {s.mode}"
    if s.placement:
        engine += f" + hot on {s.split.device}"
    engines = {engine: hybridinfer_tests(s.model, args.n_prompt, args.n_gen)}
    m = s.model
    baselines = []  # in the table's order
    if args.vs_dense and s.mode != "off":
        engines["hybridinfer dense"] = hybridinfer_tests(_dense(s), args.n_prompt, args.n_gen)
        baselines.append("hybridinfer dense")
    if args.vs_predicted:
        baselines.append("hybridinfer predicted")
        cpu = Transformer(m.args, m.w, m.n_ctx, PredictedFFN(m.args, m.n_batch, m.w.blk, m.ffn.predictor))
        engines["hybridinfer predicted"] = hybridinfer_tests(cpu, args.n_prompt, args.n_gen)
    if args.vs_llamacpp:
        peer = s.gguf.path if args.vs_llamacpp is True else Path(args.vs_llamacpp)
        if not peer.is_file():
            raise HybridInferError(f"--vs-llamacpp: model file '{peer}' not found")
        if peer == s.gguf.path and "blk.0.ffn_gate_up.weight" in s.gguf.tensors:
            raise HybridInferError(f"llama.cpp cannot read the sparse GGUF '{peer}': give the file it was converted "
                                   f"from, --vs-llamacpp ORIGINAL.gguf")
        gpu_layers = 0
        if s.split and s.split.device == "cuda":  # the same budget as whole layers, llama.cpp's way to offload
            layer_bytes = sum(t.data.nbytes for name, t in s.gguf.tensors.items() if name.startswith("blk.0."))
            gpu_layers = min(s.split.budget // layer_bytes, m.args.n_layer)
            print(f"llama.cpp: {gpu_layers} of {m.args.n_layer} layers on the GPU (n_gpu_layers, "
                  f"{layer_bytes / 2**20:.1f} MiB each)", file=sys.stderr)
        engines["llama.cpp"] = llamacpp_tests(peer, args.n_prompt, args.n_gen, args.threads, gpu_layers)
        baselines.append("llama.cpp")
    results = run_tests(engines, args.repetitions)
    ours = {r.test: r for r in results if r.engine == engine}
    json_key = {"hybridinfer dense": "ratio_vs_dense", "hybridinfer predicted": "ratio_vs_predicted",
                "llama.cpp": "ratio_vs_llamacpp"}
    ratios = {b: {r.test: ours[r.test].median / r.median for r in results if r.engine == b} for b in baselines}
    share = getattr(s.model.ffn, "active_share", None)  # predicted mode: what the speed was measured at
    if args.json:
        print(json.dumps({"model": s.gguf.path.name, "threads": args.threads, "mode": s.mode, "results": [
            {"engine": r.engine, "test": r.test, "tokens_per_s": r.median, "runs": r.tokens_per_s}
            for r in results],
            **{json_key[b]: ratios[b] for b in baselines},
            "predicted_active_share": share, "placement": s.describe_placement()}))
        return 0
    size_mib = s.gguf.path.stat().st_size / 2**20
    print(f"| model | size | engine | threads | test | t/s |{''.join(f' vs {b} |' for b in baselines)}")
    print(f"| --- | ---: | --- | ---: | --- | ---: |{' ---: |' * len(baselines)}")
    for r in results:
        extra = "".join(f" {ratios[b][r.test]:.2f}x |" if r.engine == engine else " |" for b in baselines)
        print(f"| {s.gguf.path.name} | {size_mib:.1f} MiB | {r.engine} | {args.threads} | {r.test} | "
              f"{r.median:.2f} ± {r.stdev:.2f} |{extra}")
    if s.placement:
        print(s.describe_placement(), file=sys.stderr)
    if share is not None:
        print(f"predicted mode: the predictor kept {100 * share:.1f}% of FFN neurons active over the tg steps",
              file=sys.stderr)
    return 0

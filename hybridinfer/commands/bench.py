"""Measure prompt processing (pp) and generation (tg) speed, llama-bench style.

Prints a markdown table of tokens/s (median of -r runs after a warm-up); with --vs-llamacpp the same
tests run on llama.cpp (llama-cpp-python, same file, same threads) in the same run, the two engines
taking turns run by run, with a ratio.
"""

import argparse
import json
import sys

from hybridinfer.bench import hybridinfer_tests, llamacpp_tests, run_tests
from hybridinfer.commands.common import add_model_arguments, int_at_least, load_session


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, None, None)
    parser.add_argument("-p", "--n-prompt", type=int_at_least(0), default=512, help="prompt tokens (default: 512)")
    parser.add_argument("-n", "--n-gen", type=int_at_least(0), default=128, help="generated tokens (default: 128)")
    parser.add_argument("-r", "--repetitions", type=int_at_least(1), default=5, help="runs per test (default: 5)")
    parser.add_argument("--vs-llamacpp", action="store_true", help="run llama.cpp on the same file and compare")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    s = load_session(args, n_ctx=max(args.n_prompt, args.n_gen, 1))
    engines = {"hybridinfer": hybridinfer_tests(s.model, args.n_prompt, args.n_gen)}
    if args.vs_llamacpp:
        engines["llama.cpp"] = llamacpp_tests(s.gguf.path, args.n_prompt, args.n_gen, args.threads)
    all_results = run_tests(engines, args.repetitions)
    results = [r for r in all_results if r.engine == "hybridinfer"]
    baseline = {r.test: r for r in all_results if r.engine == "llama.cpp"}
    rows = [(r, r.median / baseline[r.test].median if r.test in baseline else None) for r in results]
    share = getattr(s.model.ffn, "active_share", None)  # predicted mode: what the speed was measured at
    if args.json:
        print(json.dumps({"model": s.gguf.path.name, "threads": args.threads, "results": [
            {"engine": r.engine, "test": r.test, "tokens_per_s": r.median, "runs": r.tokens_per_s}
            for r in [*results, *baseline.values()]],
            "ratio_vs_llamacpp": {r.test: ratio for r, ratio in rows if ratio is not None},
            "predicted_active_share": share}))
        return 0
    size_mib = s.gguf.path.stat().st_size / 2**20
    print(f"| model | size | engine | threads | test | t/s |{' vs llama.cpp |' if baseline else ''}")
    print(f"| --- | ---: | --- | ---: | --- | ---: |{' ---: |' if baseline else ''}")
    for r, ratio in [*rows, *[(b, None) for b in baseline.values()]]:
        extra = (f" {ratio:.2f}x |" if ratio is not None else " |") if baseline else ""
        print(f"| {s.gguf.path.name} | {size_mib:.1f} MiB | {r.engine} | {args.threads} | {r.test} | "
              f"{r.median:.2f} ± {r.stdev:.2f} |{extra}")
    if share is not None:
        print(f"predicted mode: the predictor kept {100 * share:.1f}% of FFN neurons active over the tg steps",
              file=sys.stderr)
    return 0

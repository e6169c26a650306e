"""Generate text from a prompt, streaming it to stdout (llama-cli style).

Timings go to stderr after generation; --json prints one JSON object instead of streaming.
"""

import argparse
import json
import sys
from pathlib import Path

from hybridinfer.chat import render_chat
from hybridinfer.commands.common import add_model_arguments, float_in, int_at_least, load_session
from hybridinfer.errors import EXIT_INTERRUPTED, HybridInferError
from hybridinfer.generate import generate
from hybridinfer.sampling import Sampler, SamplingParams

DEFAULT_PROMPT = "And it came to pass, when the king"
D = SamplingParams()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, 0, "context size in tokens (default: 0 = the model's, at most 4096)")
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help=f"prompt (default: '{DEFAULT_PROMPT}')")
    parser.add_argument("-n", "--n-predict", type=int_at_least(-1), default=128,
                        help="tokens to generate, -1 until a stop token or the context is full (default: 128)")
    parser.add_argument("--temp", type=float_in(0.0, 100.0), default=D.temp,
                        help=f"temperature, 0 for greedy (default: {D.temp})")
    parser.add_argument("--top-k", type=int_at_least(0), default=D.top_k, help=f"0 disables (default: {D.top_k})")
    parser.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=D.top_p,
                        help=f"1 disables (default: {D.top_p})")
    parser.add_argument("--repeat-penalty", type=float_in(0.0, 100.0, low_open=True), default=D.repeat_penalty,
                        help=f"penalty for the last {D.repeat_last_n} tokens, 1 disables (default: {D.repeat_penalty})")
    parser.add_argument("--seed", type=int_at_least(0), help="random seed (default: random)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--chat-template", type=Path, metavar="FILE",
                        help="Jinja chat template to use instead of the model's (implies --chat)")
    parser.add_argument("--stats", action="store_true",
                        help="report true and predicted sparsity, recall and precision per layer (computes the "
                             "dense gate too, so its timings are not for speed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with text, ids and timings")


def main(args: argparse.Namespace) -> int:
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise HybridInferError(f"the prompt is not valid UTF-8 (at character {e.start}): give it in UTF-8") from None
    s = load_session(args, stats=args.stats)
    chat = args.chat or args.chat_template is not None
    text = render_chat(s.gguf.metadata, args.prompt, args.chat_template) if chat else args.prompt
    prompt = s.tokenizer.encode(text, add_special=True, parse_special=chat)
    sampler = Sampler(SamplingParams(args.temp, args.top_k, args.top_p, args.repeat_penalty, D.repeat_last_n,
                                     args.seed))
    stream = None if args.json else lambda piece: print(piece, end="", flush=True)
    if stream:
        stream(text)
    try:
        g = generate(s.model, s.tokenizer, prompt, args.n_predict, sampler, stream or (lambda piece: None))
    except HybridInferError:
        if stream:
            print(flush=True)  # the error line goes on a line of its own, not after the streamed text
        raise
    timings = {"load_ms": s.load_s * 1e3, "prompt_tokens": g.prompt_tokens, "prompt_ms": g.prompt_s * 1e3,
               "prompt_tokens_per_s": g.prompt_tps, "generated_tokens": len(g.ids), "generation_ms": g.gen_s * 1e3,
               "generation_tokens_per_s": g.gen_tps, "time_to_first_token_ms": (s.load_s + g.first_token_s) * 1e3,
               "stopped_by": g.stopped_by, "sparse": s.mode}
    stats = None
    if s.stats:
        predictor_s = getattr(s.model.ffn, "predictor_s", 0.0)
        stats = {**s.stats.as_dict(), "predictor_share_of_time": predictor_s / max(g.prompt_s + g.gen_s, 1e-9),
                 "placement": s.describe_placement()}
    if args.json:
        print(json.dumps({"prompt": text, "prompt_ids": prompt, "text": g.text, "ids": g.ids, **timings,
                          "stats": stats}))
        return EXIT_INTERRUPTED if g.stopped_by == "interrupted" else 0
    print(flush=True)
    log = sys.stderr
    print(f"\nload time        = {timings['load_ms']:10.2f} ms", file=log)
    print(f"prompt eval time = {timings['prompt_ms']:10.2f} ms / {g.prompt_tokens:5d} tokens "
          f"({g.prompt_tps:8.2f} tokens per second)", file=log)
    print(f"eval time        = {timings['generation_ms']:10.2f} ms / {max(len(g.ids) - 1, 0):5d} runs   "
          f"({g.gen_tps:8.2f} tokens per second)", file=log)
    print(f"time to first token = {timings['time_to_first_token_ms']:.2f} ms (load + prompt), "
          f"stopped by {g.stopped_by}, FFN mode {s.mode}", file=log)
    if stats and s.mode == "input":
        print(f"\nInput sparsity over prompt and generated tokens: the share of each matrix's inputs dropped "
              f"(input mode):\n{s.stats.markdown()}", file=log)
    elif stats:
        print(f"\nFFN sparsity over prompt and generated tokens ({s.mode} mode; the true set comes from the "
              f"dense gate, computed for these figures only):\n{s.stats.markdown()}", file=log)
        if s.mode == "predicted":
            print(f"predictor: {100 * stats['predictor_share_of_time']:.1f}% of the forward time", file=log)
        if s.placement:
            print(s.describe_placement(), file=log)
    return EXIT_INTERRUPTED if g.stopped_by == "interrupted" else 0

"""llama-bench's two tests, for this engine and for llama.cpp on the same file.

pp: one prompt of n random tokens from an empty cache; tg: n single-token decode steps from an empty
cache, each fed a random token. Each test runs once to warm up, then `reps` times.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.model import Transformer


@dataclass
class BenchResult:
    engine: str
    test: str  # "pp512", "tg128", ...
    tokens_per_s: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0


def _measure(engine: str, test: str, n_tokens: int, reps: int, run_once: Callable[[], None]) -> BenchResult:
    run_once()  # warm-up
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        run_once()
        rates.append(n_tokens / (time.perf_counter() - start))
    return BenchResult(engine, test, rates)


def bench_hybridinfer(model: Transformer, n_prompt: int, n_gen: int, reps: int, seed: int = 0) -> list[BenchResult]:
    rng = np.random.default_rng(seed)
    n_vocab = model.args.n_vocab
    results = []
    if n_prompt:
        prompt = rng.integers(0, n_vocab, n_prompt)
        results.append(_measure("hybridinfer", f"pp{n_prompt}", n_prompt, reps, lambda: model.forward(prompt, 0)))
    if n_gen:
        tokens = rng.integers(0, n_vocab, n_gen)

        def decode():
            for pos, token in enumerate(tokens):
                model.forward(tokens[pos:pos + 1], pos)
        results.append(_measure("hybridinfer", f"tg{n_gen}", n_gen, reps, decode))
    return results


def bench_llamacpp(path: Path, n_prompt: int, n_gen: int, reps: int, threads: int, seed: int = 0) -> list[BenchResult]:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise HybridInferError("--vs-llamacpp needs llama-cpp-python: pip install 'hybridinfer[llamacpp]'") from None
    llm = Llama(model_path=str(path), n_ctx=max(n_prompt, n_gen, 1), n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(seed)
    results = []
    if n_prompt:
        prompt = rng.integers(0, llm.n_vocab(), n_prompt).tolist()

        def prefill():
            llm.reset()
            llm.eval(prompt)
        results.append(_measure("llama.cpp", f"pp{n_prompt}", n_prompt, reps, prefill))
    if n_gen:
        tokens = rng.integers(0, llm.n_vocab(), n_gen).tolist()

        def decode():
            llm.reset()
            for token in tokens:
                llm.eval([token])
        results.append(_measure("llama.cpp", f"tg{n_gen}", n_gen, reps, decode))
    return results

"""llama-bench's two tests, for this engine and for llama.cpp on the same file.

pp: one prompt of n random tokens from an empty cache; tg: n single-token decode steps from an empty
cache, each fed a random token. Each test runs once to warm up, then `reps` times, the engines
taking turns.
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


Test = tuple[int, Callable[[], None]]  # tokens per run, and one run


def run_tests(engines: dict[str, dict[str, Test]], reps: int) -> list[BenchResult]:
    """Each engine's tests ({engine: {test name: test}}), each warmed up once, then run `reps` times.

    The engines take turns run by run, so that a change in the machine's load (it is shared) falls on
    all of them alike instead of on whichever ran last. Results: tests in order, engines in order.
    """
    results = []
    for test in dict.fromkeys(t for tests in engines.values() for t in tests):
        runs = {engine: tests[test] for engine, tests in engines.items() if test in tests}
        for _, run_once in runs.values():
            run_once()  # warm-up
        rates = {engine: [] for engine in runs}
        for _ in range(reps):
            for engine, (n_tokens, run_once) in runs.items():
                start = time.perf_counter()
                run_once()
                rates[engine].append(n_tokens / (time.perf_counter() - start))
        results += [BenchResult(engine, test, r) for engine, r in rates.items()]
    return results


def hybridinfer_tests(model: Transformer, n_prompt: int, n_gen: int, seed: int = 0) -> dict[str, Test]:
    rng = np.random.default_rng(seed)
    n_vocab = model.args.n_vocab
    tests = {}
    if n_prompt:
        prompt = rng.integers(0, n_vocab, n_prompt)
        tests[f"pp{n_prompt}"] = n_prompt, lambda: model.forward(prompt, 0)
    if n_gen:
        tokens = rng.integers(0, n_vocab, n_gen)

        def decode():
            for pos, token in enumerate(tokens):
                model.forward(tokens[pos:pos + 1], pos)
        tests[f"tg{n_gen}"] = n_gen, decode
    return tests


def llamacpp_tests(path: Path, n_prompt: int, n_gen: int, threads: int, gpu_layers: int = 0,
                   seed: int = 0) -> dict[str, Test]:
    try:
        from llama_cpp import Llama, llama_supports_gpu_offload
    except ImportError:
        raise HybridInferError("--vs-llamacpp needs llama-cpp-python: pip install 'hybridinfer[llamacpp]'") from None
    if gpu_layers and not llama_supports_gpu_offload():
        raise HybridInferError("--vs-llamacpp with the GPU needs a CUDA build of llama-cpp-python (this one runs on "
                               "the CPU only)")
    llm = Llama(model_path=str(path), n_ctx=max(n_prompt, n_gen, 1), n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False)
    rng = np.random.default_rng(seed)
    tests = {}
    if n_prompt:
        prompt = rng.integers(0, llm.n_vocab(), n_prompt).tolist()

        def prefill():
            llm.reset()
            llm.eval(prompt)
        tests[f"pp{n_prompt}"] = n_prompt, prefill
    if n_gen:
        tokens = rng.integers(0, llm.n_vocab(), n_gen).tolist()

        def decode():
            llm.reset()
            for token in tokens:
                llm.eval([token])
        tests[f"tg{n_gen}"] = n_gen, decode
    return tests

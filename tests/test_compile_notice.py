"""A first run says on stderr that kernels compile, and is silent when they come from the cache; after
Transformer.warm_up a run compiles (or loads) nothing more, so no notice lands inside streamed text."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR
from hybridinfer.ffn import make_ffn
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import ModelArgs, load_weights, model_fingerprint
from hybridinfer.model import N_BATCH, Transformer
from hybridinfer.predictors import PredictorSet, SparsityStats


def test_notice_when_compiling_silent_when_cached(tmp_path):
    (tmp_path / "tiny_kernel.py").write_text("from numba import njit\n\n\n@njit(cache=True)\n"
                                             "def add_one(x):\n    return x + 1\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from hybridinfer.kernels import compile_notice
        with compile_notice():
            import tiny_kernel
            print(tiny_kernel.add_one(41))
    """)
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    first, second = runs
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout == "42\n"  # the notice never goes to stdout
    lines = first.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("compiling kernels for this machine"), first.stderr
    assert lines[1].startswith("compiled 1 kernel in "), first.stderr
    assert second.stderr == ""  # loaded from the cache: nothing to say


@pytest.fixture
def new_overloads(monkeypatch):
    """Names of the kernels given a new signature (compiled or loaded from the cache) while recording."""
    added = []
    add = Dispatcher.add_overload

    def recording(self, cres):
        added.append(self.py_func.__qualname__)
        add(self, cres)

    monkeypatch.setattr(Dispatcher, "add_overload", recording)
    return added


@pytest.mark.parametrize("mode", ["off", "exact", "predicted"])
@pytest.mark.parametrize("n_prompt", [1, 2, 5])
def test_warm_up_leaves_nothing_to_compile(mode, n_prompt, new_overloads):
    gguf = GGUFFile(DEFAULT_MODEL)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    predictor = (PredictorSet.load(DEFAULT_PREDICTOR, model_fingerprint(gguf, args))
                 if mode == "predicted" else None)
    stats = SparsityStats(args.n_layer, args.n_ff) if mode != "off" else None
    model = Transformer(args, weights, 64, make_ffn(mode, args, weights.blk, N_BATCH, predictor, stats))
    model.warm_up()
    if stats:
        assert stats.tokens.sum() == 0  # the warm-up is not counted
    assert getattr(model.ffn, "decoded", [0, 0]) == [0, 0]
    _generate_compiles_nothing(model, args, n_prompt, new_overloads)


def _generate_compiles_nothing(model, args, n_prompt, new_overloads):
    new_overloads.clear()
    tokens = np.random.default_rng(n_prompt).integers(3, args.n_vocab, n_prompt + 3)
    model.forward(tokens[:n_prompt], 0)
    for pos in range(n_prompt, len(tokens)):
        model.forward(tokens[pos:pos + 1], pos)
    assert new_overloads == []


@pytest.mark.parametrize("counting", [False, True])
def test_warm_up_leaves_nothing_to_compile_in_input_mode(counting, new_overloads):
    """--sparse input, its fused decode and (--stats) its step matrix by matrix."""
    from hybridinfer.inputs import InputSparseFFN, InputSparsity
    from hybridinfer.predictors.thresholds import TEAL_MATRICES, Thresholds
    gguf = GGUFFile(DEFAULT_MODEL)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    th = Thresholds("teal", model_fingerprint(gguf, args), [{name: np.array([0.5], np.float32) for name in
                                                             TEAL_MATRICES} for _ in range(args.n_layer)])
    inputs = InputSparsity(weights.blk, th, N_BATCH)
    model = Transformer(args, weights, 64, InputSparseFFN(args, N_BATCH, inputs, counting), inputs=inputs)
    model.warm_up()
    assert inputs.seen.sum() == 0  # the warm-up is not counted
    _generate_compiles_nothing(model, args, 2, new_overloads)

"""The hot/cold split (HybridFFN) with its fast side on the CPU equals predicted mode for the same
predicted sets, to float rounding, at every budget: none (then bit for bit), a few groups, everything;
on the default model and on one layer of 7B width. The budget bounds the bytes the side allocates."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR, DEFAULT_STATS
from hybridinfer.ffn import CPUSide, HybridFFN, PredictedFFN
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.kernels import quant
from hybridinfer.loader import Block, FFNActivation, Matrix, ModelArgs, load_weights, model_fingerprint, round_input
from hybridinfer.model import N_BATCH, Transformer
from hybridinfer.placement import GROUP, neuron_bytes, place
from hybridinfer.predictors import PredictorSet, activity
from hybridinfer.predictors.activity import ActivationStats
from make_gguf import write_llama_gguf


@pytest.fixture(scope="module")
def tiny():
    gguf = GGUFFile(DEFAULT_MODEL)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    fp = model_fingerprint(gguf, args)
    return args, weights, PredictorSet.load(DEFAULT_PREDICTOR, fp), activity.load(DEFAULT_STATS, fp)


def budgets(args, weights):
    """None, three groups, everything: the budgets every comparison runs at."""
    per_group = GROUP * neuron_bytes(weights.blk[0])
    return [0, 3 * per_group + CPUSide.scratch_bytes(args), 10**10]


def split(args, weights, predictor, stats, budget):
    p = place(stats, [neuron_bytes(b) for b in weights.blk], budget, CPUSide.scratch_bytes(args))
    side = CPUSide(args)
    ffn = HybridFFN(args, N_BATCH, weights.blk, predictor, p, side)
    assert side.nbytes <= budget and side.nbytes == p.nbytes
    return ffn


def test_same_sets_same_output_on_every_layer(tiny):
    args, weights, predictor, stats = tiny
    plain = PredictedFFN(args, N_BATCH, weights.blk, predictor)
    rng = np.random.default_rng(0)
    for budget in budgets(args, weights):
        ffn = split(args, weights, predictor, stats, budget)
        for layer in range(args.n_layer):
            x = rng.standard_normal((1, args.n_embd)).astype(np.float32)
            idx = predictor.active_indices(layer, x[0]).copy()
            x = round_input(plain.gate_up[layer].qtype, x)[0].copy()
            want, got = np.empty(args.n_embd, np.float32), np.empty(args.n_embd, np.float32)
            plain._decode(layer, idx, x, want)
            ffn._decode(layer, idx, x, got)
            if budget == 0:
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_default_model_in_lockstep(tiny):
    """Decoding with predicted mode, every layer's FFN also runs split on the same input and sets.
    (Logits a few tokens later are no fair test on a quantised model: the kernels round each input to
    8-bit blocks, as ggml does, so a rounding difference can flip a step of that grid.)"""
    args, weights, predictor, stats = tiny
    plain = PredictedFFN(args, N_BATCH, weights.blk, predictor)
    splits = [split(args, weights, predictor, stats, b) for b in budgets(args, weights)]
    compared = []

    def both(layer, blk, resid, xn, out):
        plain(layer, blk, resid, xn, out)
        for ffn in splits:
            got = np.empty_like(out)
            ffn(layer, blk, resid, xn, got)
            np.testing.assert_allclose(got, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
        compared.append(layer)

    model = Transformer(args, weights, 16, plain)
    model.ffn = both
    tokens = np.array([1, 450, 1020, 77, 3000, 12])
    for i in range(len(tokens)):
        model.forward(tokens[i:i + 1], i)
    assert len(compared) == len(tokens) * args.n_layer


def random_model(path, qtype, n_ff, seed, **sizes):
    """A random 2-layer ReLU model of n_embd 64 in qtype, a power-law profile and a random predictor."""
    gguf = GGUFFile(write_llama_gguf(path, qtype=qtype, n_layer=2, n_embd=64, n_ff=n_ff, **sizes))
    args = ModelArgs.from_metadata(gguf.metadata)
    rng = np.random.default_rng(seed)
    stats = ActivationStats([(rng.pareto(1.0, n_ff) * 10).astype(np.int64) for _ in range(2)], 10**6, None)
    predictor = PredictorSet.from_arrays([rng.standard_normal((8, 64)) for _ in range(2)],
                                         [rng.standard_normal((n_ff, 8)) for _ in range(2)], [2.0, 2.0])
    return args, load_weights(gguf, args), stats, predictor, rng


def test_float_model_logits(tmp_path):
    """With F32 weights only the KV cache rounds (to f16, as llama.cpp's): the logits agree to float rounding."""
    args, weights, stats, predictor, rng = random_model(tmp_path / "relu.gguf", Q.F32, 1024, seed=2)
    tokens = rng.integers(3, 200, 12)

    def logits(ffn):
        model = Transformer(args, weights, 16, ffn)
        return np.stack([model.forward(tokens[i:i + 1], i)[0].copy() for i in range(len(tokens))])

    want = logits(PredictedFFN(args, N_BATCH, weights.blk, predictor))
    for budget in budgets(args, weights):
        got = logits(split(args, weights, predictor, stats, budget))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_one_layer_of_7b_width():
    n_embd, n_ff = 4096, 11008
    rng = np.random.default_rng(1)
    args = ModelArgs(1, n_embd, n_ff, 32, 32, 128, 128, 10000.0, 1e-5, 4096, 32000, FFNActivation("relu"))

    def q4(rows, cols):
        values = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        return Matrix(Q.Q4_0, quant.quantize(values, Q.Q4_0), cols, rows)

    blk = Block(None, None, None, None, None, None, q4(n_ff, n_embd), q4(n_ff, n_embd), q4(n_embd, n_ff))
    stats = ActivationStats([(rng.pareto(1.0, n_ff) * 10).astype(np.int64)], 10**6, None)
    predictor = PredictorSet.all_active(1, n_embd, n_ff)
    plain = PredictedFFN(args, 1, [blk], predictor)
    per_group = GROUP * neuron_bytes(blk)
    x = round_input(Q.Q4_0, rng.standard_normal((1, n_embd)).astype(np.float32))[0].copy()
    idx = np.sort(rng.choice(n_ff, n_ff // 9, replace=False)).astype(np.int32)  # ~11% active, as ProSparse
    want = np.empty(n_embd, np.float32)
    plain._decode(0, idx, x, want)
    for budget in (0, 3 * per_group + CPUSide.scratch_bytes(args), 10**10):
        p = place(stats, [neuron_bytes(blk)], budget, CPUSide.scratch_bytes(args))
        ffn = HybridFFN(args, 1, [blk], predictor, p, CPUSide(args))
        got = np.empty(n_embd, np.float32)
        ffn._decode(0, idx, x, got)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cuda_side_equals_cpu_side(tmp_path):
    """The GPU side (in the CUDA simulator here, on the device in tools/gpu_check.sh) gives the CPU
    side's output to float rounding, in one launch per layer, allocating exactly what the placement
    counted."""
    from hybridinfer.cuda_side import CUDASide
    from hybridinfer.kernels import cuda
    if cuda.available():
        pytest.skip(cuda.available())
    args, weights, stats, _, rng = random_model(tmp_path / "q4.gguf", Q.Q4_0, 128, seed=4)
    predictor = PredictorSet.all_active(2, args.n_embd, args.n_ff)
    sizes = [neuron_bytes(b) for b in weights.blk]
    for budget in (CUDASide.scratch_bytes(args) + 32 * sizes[0], 10**9):
        p = place(stats, sizes, budget, CUDASide.scratch_bytes(args), group=32)
        gpu = CUDASide(args)
        on_gpu, on_cpu = (HybridFFN(args, 1, weights.blk, predictor, p, side) for side in (gpu, CPUSide(args)))
        assert gpu.nbytes == p.nbytes <= budget
        for layer in range(2):
            x = rng.standard_normal(args.n_embd).astype(np.float32)
            idx = np.sort(rng.choice(args.n_ff, 40, replace=False)).astype(np.int32)
            want, got = np.empty(args.n_embd, np.float32), np.empty(args.n_embd, np.float32)
            on_cpu._decode(layer, idx, x, want)
            launched = cuda.launches()
            on_gpu._decode(layer, idx, x, got)
            assert cuda.launches() - launched == (len(p.hot[layer]) > 0)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_layers_on_the_cuda_side(tmp_path):
    """With room for every layer's attention, the GPU side runs it (4 launches a layer a token) and
    the split model's logits follow predicted mode's through a prefill on the CPU (whose cache rows
    the GPU takes) and decode steps on the GPU; the side allocates exactly what the placement counted."""
    from hybridinfer.commands.common import Split
    from hybridinfer.kernels import cuda
    if cuda.available():
        pytest.skip(cuda.available())
    args, weights, stats, predictor, rng = random_model(tmp_path / "f32.gguf", Q.F32, 64, seed=5, n_head=4,
                                                        n_head_kv=2, n_ctx=16)
    split = Split("cuda", 10**8, stats).model(args, weights, 16, predictor)
    placement, side = split.ffn.placement, split.ffn.side
    assert placement.layers == 2 and all(len(h) == 64 for h in placement.hot)
    assert side.nbytes == placement.nbytes <= 10**8
    plain = Transformer(args, weights, 16, PredictedFFN(args, N_BATCH, weights.blk, predictor))
    tokens = rng.integers(3, 200, 7)
    for model in (plain, split):
        model.forward(tokens[:5], 0)
    launched = cuda.launches()
    for pos in range(5, 7):
        want, got = (m.forward(tokens[pos:pos + 1], pos)[0].copy() for m in (plain, split))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert cuda.launches() - launched == 2 * 2 * (cuda.AttentionDecoder.LAUNCHES + 1)

"""The FFN modes: exact equals dense, predicted with an all-active predictor equals dense, and a
predictor's choices are honoured and counted."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridinfer.ffn import make_ffn
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import ModelArgs, load_weights
from hybridinfer.model import N_BATCH, Transformer
from make_gguf import write_llama_gguf
from hybridinfer.predictors import PredictorSet, SparsityStats


def build(path, mode, predictor=None, stats=None, n_ctx=64):
    gguf = GGUFFile(path)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    return Transformer(args, weights, n_ctx, make_ffn(mode, args, weights.blk, N_BATCH, predictor, stats))


def decode_logits(model, tokens):
    """Logits of every position, fed one token at a time (the sparse decode path)."""
    return np.stack([model.forward(tokens[i:i + 1], i)[0].copy() for i in range(len(tokens))])


@pytest.fixture(scope="module")
def relu_f32(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "relu.gguf", qtype=Q.F32, n_embd=64, n_ff=128)


TOKENS = np.random.default_rng(3).integers(3, 200, 20)


@pytest.mark.parametrize("path_fixture", ["relu_f32", "tiny_q8"])
def test_exact_equals_dense(request, path_fixture):
    path = request.getfixturevalue(path_fixture)
    dense, exact = build(path, "off"), build(path, "exact")
    np.testing.assert_array_equal(decode_logits(exact, TOKENS), decode_logits(dense, TOKENS))
    np.testing.assert_array_equal(exact.forward(TOKENS, 0, all_logits=True), dense.forward(TOKENS, 0, all_logits=True))


def test_all_active_predictor_gives_dense_results(relu_f32):
    args = ModelArgs.from_metadata(GGUFFile(relu_f32).metadata)
    everything = PredictorSet.all_active(args.n_layer, args.n_embd, args.n_ff)
    dense, predicted = build(relu_f32, "off"), build(relu_f32, "predicted", everything)
    expected = decode_logits(dense, TOKENS)
    np.testing.assert_allclose(decode_logits(predicted, TOKENS), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    batched = predicted.forward(TOKENS, 0, all_logits=True)
    np.testing.assert_allclose(batched, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_predicted_decode_and_batch_agree_and_count(relu_f32):
    """A random predictor: decode and batched paths give the same logits and the same statistics."""
    args = ModelArgs.from_metadata(GGUFFile(relu_f32).metadata)
    rng = np.random.default_rng(0)
    fc1 = [rng.standard_normal((16, args.n_embd)) for _ in range(args.n_layer)]
    fc2 = [rng.standard_normal((args.n_ff, 16)) for _ in range(args.n_layer)]
    predictor = PredictorSet.from_arrays(fc1, fc2, [0.0] * args.n_layer)
    stats_decode, stats_batch = SparsityStats(args.n_layer, args.n_ff), SparsityStats(args.n_layer, args.n_ff)
    stepped = decode_logits(build(relu_f32, "predicted", predictor, stats_decode), TOKENS)
    batched = build(relu_f32, "predicted", predictor, stats_batch).forward(TOKENS, 0, all_logits=True)
    np.testing.assert_allclose(stepped, batched, rtol=0, atol=1e-4 * np.abs(batched).max())
    assert stats_decode.overall()["tokens"] == stats_batch.overall()["tokens"] == len(TOKENS) * args.n_layer
    for key in ("predicted_sparsity", "true_sparsity"):
        assert stats_decode.overall()[key] == pytest.approx(stats_batch.overall()[key], abs=0.02)
    assert 0.3 < stats_decode.overall()["predicted_sparsity"] < 0.7  # about half the logits are >= 0
    dense = decode_logits(build(relu_f32, "off"), TOKENS)
    assert np.abs(stepped - dense).max() > 1e-3  # skipping neurons changed the result


@pytest.mark.parametrize("gate_type, up_type, expected", [(Q.Q4_0, Q.Q4_0, Q.Q4_0), (Q.Q8_0, Q.F16, Q.Q8_0),
                                                          (Q.Q6_K, Q.Q6_K, Q.Q6_K), (Q.Q6_K, Q.Q8_0, Q.Q8_0)])
def test_interleaved_gate_up_rows(gate_type, up_type, expected):
    """Decode's gate/up copy: neuron i's gate row at 2i, its up row at 2i + 1, in one type."""
    from gguf import dequantize, quantize
    from hybridinfer.loader import Matrix, interleaved_rows

    rng = np.random.default_rng(0)

    def matrix(qtype):
        if qtype == Q.Q6_K:  # gguf cannot quantise Q6_K: random blocks with a sane f16 scale d
            blocks = rng.integers(0, 256, (40, 210), dtype=np.uint8)
            blocks[:, 208:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            return Matrix(qtype, blocks, 256, 40)
        values = rng.standard_normal((40, 256)).astype(np.float32)
        return Matrix(qtype, quantize(values, qtype).view(np.uint8).reshape(40, -1), 256, 40)

    gate, up = matrix(gate_type), matrix(up_type)
    both = interleaved_rows(gate, up)
    assert (both.qtype, both.n_in, both.n_out) == (expected, 256, 80)
    got = dequantize(both.data, both.qtype).reshape(80, 256)
    for m, rows in ((gate, got[0::2]), (up, got[1::2])):
        original = dequantize(m.data, m.qtype).reshape(40, 256)
        np.testing.assert_allclose(rows, original, atol=0.02 * np.abs(original).max())

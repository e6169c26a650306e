"""The sparse kernels (gather-GEMV over active rows, sparse axpy over neuron-major down columns, and
the predictor and FFN decode steps built on them) against NumPy on gguf's dequantization, on the
edge cases: no row, one, all, the last one."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import dequantize, quantize

from hybridinfer import kernels
from hybridinfer.kernels import reference
from hybridinfer.kernels.ops import DRELU, FATRELU, RELU, SILU
from hybridinfer.kernels.sparse import JUMP, _balanced_bounds, select_active

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def blocks(qtype, values):
    data = quantize(values, qtype)
    return data.view(np.uint8).reshape(values.shape[0], -1)


def row_sets(n):
    rng = np.random.default_rng(1)
    return {"none": [], "one": [3], "last": [n - 1], "all": list(range(n)),
            "some": sorted(rng.choice(n, n // 5, replace=False))}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("which", ["none", "one", "last", "all", "some"])
def test_gather_matvec(qtype, which):
    rng = np.random.default_rng(0)
    w = blocks(qtype, rng.standard_normal((70, 96)).astype(np.float32))
    dense = dequantize(w, qtype).reshape(70, 96)
    rows = np.array(row_sets(70)[which], np.int32)
    x = rng.standard_normal(96).astype(np.float32)
    out = np.full(len(rows), np.nan, np.float32)
    kernels.gather_matvec(qtype, w, rows, x, out)
    np.testing.assert_allclose(out, reference.matvec(qtype, w, x)[rows], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("which", ["none", "one", "last", "all", "some"])
def test_sparse_axpy(qtype, which):
    rng = np.random.default_rng(0)
    w = blocks(qtype, rng.standard_normal((70, 96)).astype(np.float32))  # neuron-major [n_ff, n_embd]
    dense = dequantize(w, qtype).reshape(70, 96)
    rows = np.array(row_sets(70)[which], np.int32)
    coeffs = rng.standard_normal(len(rows)).astype(np.float32)
    coeffs[::3] = 0.0  # zero activations are skipped
    out = np.full(96, np.nan, np.float32)
    kernels.sparse_axpy(qtype, w, rows, coeffs, out)
    np.testing.assert_allclose(out, coeffs @ dense[rows], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n_embd", [80, 96])
def test_sparse_axpy_batch(qtype, n_embd):
    """A batch's down projection: every token's own active rows (none for one token, all for another)."""
    if n_embd % 32 and qtype not in (Q.F32, Q.F16, Q.BF16):
        pytest.skip("quantised rows are whole 32-value blocks")
    rng = np.random.default_rng(1)
    w = blocks(qtype, rng.standard_normal((70, n_embd)).astype(np.float32))
    dense = dequantize(w, qtype).reshape(70, n_embd)
    coeffs = rng.standard_normal((4, 70)).astype(np.float32)
    coeffs[0] = 0.0
    coeffs[2, rng.random(70) < 0.8] = 0.0
    out = np.full((4, n_embd), np.nan, np.float32)
    kernels.sparse_axpy_batch(qtype, w, np.ascontiguousarray(coeffs.T), out)
    np.testing.assert_allclose(out, coeffs @ dense, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="coeffs_t"):
        kernels.sparse_axpy_batch(qtype, w, coeffs, out)  # [T, n_ff] instead of [n_ff, T]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
@pytest.mark.parametrize("n_embd", [16, 80])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_axpy_odd_group_count(qtype, n_embd, threads):
    """Float rows of an odd number of 16-value groups: the unpaired last group, whatever the chunking."""
    rng = np.random.default_rng(0)
    w = blocks(qtype, rng.standard_normal((20, n_embd)).astype(np.float32))
    dense = dequantize(w, qtype).reshape(20, n_embd)
    rows = np.array([0, 4, 5, 19], np.int32)
    coeffs = rng.standard_normal(len(rows)).astype(np.float32)
    out = np.full(n_embd, np.nan, np.float32)
    kernels.set_threads(threads)
    try:
        kernels.sparse_axpy(qtype, w, rows, coeffs, out)
    finally:
        kernels.set_threads(2)
    np.testing.assert_allclose(out, coeffs @ dense[rows], rtol=1e-5, atol=1e-5)


def test_sparse_results_do_not_depend_on_threads():
    rng = np.random.default_rng(2)
    w = blocks(Q.Q4_0, rng.standard_normal((300, 256)).astype(np.float32))
    rows = np.arange(0, 300, 3, dtype=np.int32)
    coeffs = rng.standard_normal(len(rows)).astype(np.float32)
    results = []
    for threads in (1, 2):
        kernels.set_threads(threads)
        out = np.zeros(256, np.float32)
        kernels.sparse_axpy(Q.Q4_0, w, rows, coeffs, out)
        dots = np.zeros(len(rows), np.float32)
        kernels.gather_matvec(Q.Q4_0, w, rows, out, dots)
        results.append((out, dots))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7])
def test_gather_chunks_balance_cost(n_chunks):
    """A run of consecutive rows then scattered ones: each chunk's cost (a row 1, a jump JUMP more)
    lies within one scattered row's of an equal share, the chunks covering the rows in order."""
    rows = np.concatenate([np.arange(100), np.arange(200, 1000, 10)]).astype(np.int32)
    bounds = _balanced_bounds(rows, n_chunks)
    assert bounds[0] == 0 and bounds[-1] == len(rows) and np.all(np.diff(bounds) >= 0)
    jumps = np.concatenate([[True], np.diff(rows) != 1])
    cost = np.concatenate([[0.0], np.cumsum(1.0 + JUMP * jumps)])
    shares = np.diff(cost[bounds])
    assert np.all(np.abs(shares - cost[-1] / n_chunks) <= 1.0 + JUMP)
    assert len(_balanced_bounds(rows[:0], n_chunks)) == n_chunks + 1


@pytest.mark.parametrize("rows, message", [
    (np.array([0, 70], np.int32), "rows must lie in"),
    (np.array([-1], np.int32), "rows must lie in"),
    (np.array([1, 2], np.int64), "int32"),
])
def test_bad_rows_are_refused(rows, message):
    w = blocks(Q.Q8_0, np.zeros((70, 96), np.float32))
    with pytest.raises(ValueError, match=message):
        kernels.gather_matvec(Q.Q8_0, w, rows, np.zeros(96, np.float32), np.zeros(len(rows), np.float32))
    with pytest.raises(ValueError, match=message):
        kernels.sparse_axpy(Q.Q8_0, w, rows, np.zeros(len(rows), np.float32), np.zeros(96, np.float32))


@pytest.mark.parametrize("logits, threshold", [
    (np.zeros(0), 0.0), (np.full(7, -1.0), 0.0), (np.full(7, 2.0), 0.0),
    (np.array([0.5, 0.49, 0.5, 0.51]), 0.5), (np.random.default_rng(0).standard_normal(1000), 0.3),
])
def test_select_active(logits, threshold):
    logits = logits.astype(np.float32)
    out = np.empty(len(logits), np.int32)
    n = select_active(logits, np.float32(threshold), out)
    assert np.array_equal(out[:n], reference.select_active(logits, threshold))


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0])
@pytest.mark.parametrize("threshold", [-1e9, 0.05, 1e9])  # every neuron, some, none
def test_mlp_select(qtype, threshold):
    rng = np.random.default_rng(3)
    fc1 = blocks(qtype, rng.standard_normal((32, 96)).astype(np.float32))
    fc2 = blocks(qtype, rng.standard_normal((70, 32)).astype(np.float32))
    x = rng.standard_normal(96).astype(np.float32)
    h, logits, idx = np.empty(32, np.float32), np.empty(70, np.float32), np.empty(70, np.int32)
    n = kernels.mlp_select((qtype, fc1), (qtype, fc2), threshold, x, h, logits, idx)
    expected_h = np.maximum(reference.matvec(qtype, fc1, x), 0)
    np.testing.assert_allclose(logits, reference.matvec(qtype, fc2, h), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(h, expected_h, rtol=1e-5, atol=1e-4)
    assert np.array_equal(idx[:n], reference.select_active(logits, threshold))


def test_mlp_select_refuses_mismatched_shapes():
    fc1, fc2 = blocks(Q.Q8_0, np.zeros((32, 96), np.float32)), blocks(Q.Q8_0, np.zeros((70, 64), np.float32))
    with pytest.raises(ValueError, match="fc2 takes 64 inputs but fc1 gives 32"):
        kernels.mlp_select((Q.Q8_0, fc1), (Q.Q8_0, fc2), 0.0, np.zeros(96, np.float32), np.zeros(32, np.float32),
                           np.zeros(70, np.float32), np.zeros(70, np.int32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("which", ["none", "one", "last", "all", "some"])
@pytest.mark.parametrize("kind", [RELU, FATRELU, SILU, DRELU])
def test_sparse_ffn(qtype, which, kind):
    """The FFN over a set of neurons equals down @ (act(gate @ x) * (up @ x)) with the others zeroed
    (relu(gate @ x) * relu(up @ x) for dReLU)."""
    rng = np.random.default_rng(4)
    n_ff, n_embd = 70, 96
    gate, up, down = (rng.standard_normal(shape).astype(np.float32) for shape in
                      ((n_ff, n_embd), (n_ff, n_embd), (n_ff, n_embd)))
    gate_up = blocks(qtype, np.stack([gate, up], axis=1).reshape(2 * n_ff, n_embd))
    down_t = blocks(qtype, down)  # neuron-major
    idx = np.array(row_sets(n_ff)[which], np.int32)
    x = rng.standard_normal(n_embd).astype(np.float32)
    out = np.full(n_embd, np.nan, np.float32)
    kernels.sparse_ffn((qtype, gate_up), (qtype, down_t), kind, 0.5, idx, x, out)
    dots = reference.matvec(qtype, gate_up, x).reshape(n_ff, 2)
    g, u = dots[:, 0].astype(np.float64), dots[:, 1]
    a = {RELU: np.maximum(g, 0), FATRELU: np.where(g >= 0.5, g, 0), SILU: g / (1 + np.exp(-g)),
         DRELU: np.maximum(g, 0)}[kind] * (np.maximum(u, 0) if kind == DRELU else u)
    expected = a[idx] @ dequantize(down_t, qtype).reshape(n_ff, n_embd).astype(np.float64)[idx]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


def test_sparse_ffn_refuses_mismatched_matrices():
    gate_up, down_t = blocks(Q.Q8_0, np.zeros((140, 96), np.float32)), blocks(Q.Q8_0, np.zeros((60, 96), np.float32))
    with pytest.raises(ValueError, match="does not match down"):
        kernels.sparse_ffn((Q.Q8_0, gate_up), (Q.Q8_0, down_t), RELU, 0.0, np.zeros(1, np.int32),
                           np.zeros(96, np.float32), np.zeros(96, np.float32))
    down_t = blocks(Q.Q8_0, np.zeros((70, 96), np.float32))
    with pytest.raises(ValueError, match="rows must lie in"):
        kernels.sparse_ffn((Q.Q8_0, gate_up), (Q.Q8_0, down_t), RELU, 0.0, np.array([70], np.int32),
                           np.zeros(96, np.float32), np.zeros(96, np.float32))

"""The sparse kernels (gather-GEMV over active rows, sparse axpy over neuron-major down columns)
against NumPy on gguf's dequantization, on the edge cases: no row, one, all, the last one."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import dequantize, quantize

import kernels
from kernels import reference

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

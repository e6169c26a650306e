"""Q5_0, Q5_1 and the K-quants (Q2_K to Q6_K) read in their blocks: every weight kernel against NumPy
on the gguf package's dequantisation, on rows that are not a multiple of 256 where the format allows
(Q5_0, Q5_1: multiples of 32), odd row counts, and empty / one / last / all row sets; the integer
dot products (Q5_0, Q5_1 with the input in Q8_0 blocks; Q4_K, Q5_K and Q6_K with an input on the Q8_K
grid) against ggml's own."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize

from hybridinfer import kernels
from numba import njit

from hybridinfer.kernels import cpu, ops, reference
from hybridinfer.kernels.ops import RELU, SILU
from hybridinfer.loader import Matrix

TYPES = [Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K]
# where each format keeps its f16 scales (d, and dmin for the formats with a min) in a block
_SCALES = {Q.Q2_K: (80, 84), Q.Q3_K: (108, 110), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}


INTEGER_K = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # integer dot products with an input on the Q8_K grid
_QUANTS_FROM = {Q.Q5_0: 2, Q.Q5_1: 4}  # where the qh bits and nibbles start in a Q5_0 / Q5_1 block


def weights(qtype: Q, n_out: int, n_in: int, seed: int = 0) -> np.ndarray:
    """uint8 (n_out, row_bytes) blocks as a GGUF file holds them: gguf quantises Q5_0 / Q5_1; the
    K-quants (which it cannot quantise) are random bytes with finite f16 scales of a sane size."""
    rng = np.random.default_rng(seed)
    if qtype not in _SCALES:
        return quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), qtype).view(np.uint8).reshape(n_out, -1)
    block, size = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    lo, hi = _SCALES[qtype]
    w[:, :, lo:hi] = rng.uniform(-0.01, 0.01, (n_out, n_in // block, (hi - lo) // 2)).astype(np.float16).view(np.uint8)
    return w.reshape(n_out, -1)


def widths(qtype: Q) -> list[int]:
    """n_in: one block, an odd number of blocks, and SmolLM2's 576 where the block allows it."""
    block = GGML_QUANT_SIZES[qtype][0]
    return [block, 3 * block, 576] if block == 32 else [block, 3 * block]


def assert_dots_close(out, qtype, w, x):
    """Each output within 1e-5 of its row's sum of |W[r, i] x[i]| (x as the kernel takes it: quantised to
    Q8_0 blocks for Q5_0 and Q5_1, as given for the others, whose caller rounds it)."""
    x = np.atleast_2d(x)
    if qtype in reference.INTEGER_DOT:
        x = reference.quantize_input(x)
    x = x.astype(np.float64)
    W = reference.dequantize(qtype, w).astype(np.float64)
    err = np.abs(np.atleast_2d(out) - x @ W.T)
    assert (err <= 1e-5 * (np.abs(x) @ np.abs(W).T) + 1e-30).all()


def q8k_rounded(x: np.ndarray) -> np.ndarray:
    """x[T, n] rounded to Q8_K blocks, as callers round a K-quant mat-vec's input."""
    out = np.empty_like(x)
    ops.round_for_dot(ops.ROUND_Q8_K, x, out)
    return out


def row_sets(n):
    return {"none": [], "one": [n // 2], "last": [n - 1], "all": list(range(n)),
            "some": sorted(np.random.default_rng(1).choice(n, n // 3, replace=False))}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantisation_matches_gguf(qtype):
    """get_rows decodes every value as gguf does, up to the one rounding a fused q * d + m saves."""
    for n_in in widths(qtype):
        w = weights(qtype, 37, n_in)
        ids = np.array([36, 0, 36, 18, 5], np.int64)
        out = np.full((len(ids), n_in), np.nan, np.float32)
        kernels.get_rows(qtype, w, ids, out)
        ref = reference.get_rows(qtype, w, ids)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_matvec_and_matmul(qtype, T):
    rng = np.random.default_rng(T)
    for n_out, n_in in [(1, widths(qtype)[0])] + [(37, n) for n in widths(qtype)]:
        w, x = weights(qtype, n_out, n_in), rng.standard_normal((T, n_in)).astype(np.float32)
        out = np.full((T, n_out), np.nan, np.float32)
        if T == 1:
            kernels.matvec(qtype, w, x[0], out[0])
        else:
            kernels.matmul(qtype, w, x, out)
        assert_dots_close(out, qtype, w, x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("which", ["none", "one", "last", "all", "some"])
def test_gather_matvec_equals_matvec_rows(qtype, which):
    """The gathered dot products are matvec's, bit for bit."""
    n_in = widths(qtype)[1]
    w = weights(qtype, 71, n_in)
    x = np.random.default_rng(2).standard_normal(n_in).astype(np.float32)
    rows = np.array(row_sets(71)[which], np.int32)
    dense, out = np.empty(71, np.float32), np.full(len(rows), np.nan, np.float32)
    kernels.matvec(qtype, w, x, dense)
    kernels.gather_matvec(qtype, w, rows, x, out)
    assert np.array_equal(out, dense[rows])
    if len(rows):  # gguf cannot dequantise zero blocks
        assert_dots_close(out, qtype, w[rows], x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("which", ["none", "one", "last", "all", "some"])
def test_sparse_axpy(qtype, which):
    n_embd = widths(qtype)[1]
    w = weights(qtype, 71, n_embd)  # neuron-major [n_ff, n_embd]
    rows = np.array(row_sets(71)[which], np.int32)
    coeffs = np.random.default_rng(3).standard_normal(len(rows)).astype(np.float32)
    coeffs[::3] = 0.0  # zero activations are skipped
    out = np.full(n_embd, np.nan, np.float32)
    kernels.sparse_axpy(qtype, w, rows, coeffs, out)
    dense = reference.dequantize(qtype, w).astype(np.float64)[rows]
    np.testing.assert_allclose(out, coeffs @ dense, rtol=0, atol=1e-5 * (np.abs(coeffs) @ np.abs(dense)).max())


@pytest.mark.parametrize("gu_type, down_type", [(Q.Q4_K, Q.Q5_0), (Q.Q5_K, Q.Q6_K), (Q.Q3_K, Q.Q2_K),
                                                (Q.Q5_1, Q.Q4_K)], ids=lambda q: q.name)
@pytest.mark.parametrize("which", ["none", "one", "all"])
def test_sparse_ffn(gu_type, down_type, which):
    """The FFN over a set of neurons: gathered gate and up rows, SiLU, the axpy of down."""
    n_ff, n_embd = 35, 512
    gate_up = weights(gu_type, 2 * n_ff, n_embd, seed=4)  # neuron i's gate row at 2i, up row at 2i + 1
    down_t = weights(down_type, n_ff, n_embd, seed=5)
    idx = np.array(row_sets(n_ff)[which], np.int32)
    x = np.random.default_rng(6).standard_normal(n_embd).astype(np.float32)
    out = np.full(n_embd, np.nan, np.float32)
    kernels.sparse_ffn((gu_type, gate_up), (down_type, down_t), SILU, 0.0, idx, x, out)
    dots = reference.matvec(gu_type, gate_up, x).astype(np.float64).reshape(n_ff, 2)
    a = dots[:, 0] / (1 + np.exp(-dots[:, 0])) * dots[:, 1]
    down = reference.dequantize(down_type, down_t).astype(np.float64)
    np.testing.assert_allclose(out, a[idx] @ down[idx], rtol=0, atol=1e-4 * (np.abs(a) @ np.abs(down)).max())


def test_mlp_select():
    """A predictor in the new formats: fc1 Q5_0 [256, 576], fc2 Q4_K [71, 256]."""
    fc1, fc2 = weights(Q.Q5_0, 256, 576, seed=7), weights(Q.Q4_K, 71, 256, seed=8)
    x = np.random.default_rng(9).standard_normal(576).astype(np.float32)
    h, logits, idx = np.empty(256, np.float32), np.empty(71, np.float32), np.empty(71, np.int32)
    n = kernels.mlp_select((Q.Q5_0, fc1), (Q.Q4_K, fc2), 0.0, x, h, logits, idx)
    dense = np.empty(256, np.float32)
    kernels.matvec(Q.Q5_0, fc1, x, dense)
    assert_dots_close(dense, Q.Q5_0, fc1, x)
    assert np.array_equal(h, np.maximum(dense, 0))
    assert_dots_close(logits, Q.Q4_K, fc2, h)
    assert np.array_equal(idx[:n], reference.select_active(logits, 0.0))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K], ids=lambda q: q.name)
def test_input_rounded_as_ggml_rounds_it(qtype):
    """A model's mat-vec (loader.Matrix) rounds x as ggml's vec_dot_type: Q8_0 blocks for Q5_0,
    Q8_K blocks of 256 for the K-quants."""
    n_in = 512
    w = weights(qtype, 9, n_in)
    x = np.random.default_rng(10).standard_normal((1, n_in)).astype(np.float32)
    out = np.empty((1, 9), np.float32)
    Matrix(qtype, w, n_in, 9)(x, out)
    if qtype == Q.Q5_0:
        rounded = reference.quantize_input(x)
    else:
        rounded = np.empty_like(x)
        ops.round_for_dot(ops.ROUND_Q8_K, x, rounded)
    assert not np.array_equal(rounded, x)
    assert_dots_close(out, qtype, w, rounded)
    assert ops.DOT_ROUNDING[qtype] == (ops.ROUND_Q8_0_VALUES if qtype == Q.Q5_0 else ops.ROUND_Q8_K)


def test_relu_ffn_of_k_quants_skips_inactive_neurons():
    """ReLU zeros skipped by the axpy leave the result unchanged (Q4_K gate and up, Q5_K down)."""
    n_ff, n_embd = 20, 256
    gate_up, down_t = weights(Q.Q4_K, 2 * n_ff, n_embd, seed=11), weights(Q.Q5_K, n_ff, n_embd, seed=12)
    x = np.random.default_rng(13).standard_normal(n_embd).astype(np.float32)
    every, fired = np.arange(n_ff, dtype=np.int32), np.empty(n_embd, np.float32)
    kernels.sparse_ffn((Q.Q4_K, gate_up), (Q.Q5_K, down_t), RELU, 0.0, every, x, fired)
    dots = reference.matvec(Q.Q4_K, gate_up, x).reshape(n_ff, 2)
    active = np.flatnonzero(dots[:, 0] > 0).astype(np.int32)
    only = np.empty(n_embd, np.float32)
    kernels.sparse_ffn((Q.Q4_K, gate_up), (Q.Q5_K, down_t), RELU, 0.0, active, x, only)
    np.testing.assert_allclose(only, fired, rtol=0, atol=1e-5 * np.abs(fired).max())


@njit
def _takes_integer_dots(fmt, x):
    return cpu.q8_input(fmt, x)[0].shape[0] > 0


@pytest.mark.parametrize("qtype", INTEGER_K, ids=lambda q: q.name)
def test_integer_dots_on_the_q8_k_grid(qtype):
    """An input rounded to Q8_K takes the integer path (one left unrounded takes floats, as given); its
    mat-vec and gathered dot products are the float dot products with the rounded input, and gather
    equals matvec bit for bit."""
    rng = np.random.default_rng(16)
    for n_out, n_in in [(1, 256), (37, 256), (71, 768)]:
        w = weights(qtype, n_out, n_in, seed=n_out)
        x = rng.standard_normal((1, n_in)).astype(np.float32)
        x[0, ::5] *= 30
        if n_in > 256:
            x[0, 256:512] = 0.0  # a block of zeros: scale 0
        rounded = q8k_rounded(x)
        assert _takes_integer_dots(int(qtype), rounded[0]) and not _takes_integer_dots(int(qtype), x[0])
        assert not _takes_integer_dots(int(qtype), np.where(np.arange(n_in) == 3, np.nan, rounded[0]))
        out = np.full(n_out, np.nan, np.float32)
        kernels.matvec(qtype, w, rounded[0], out)
        assert_dots_close(out, qtype, w, rounded)
        rows = np.array(row_sets(n_out)["some"] or [0], np.int32)
        gathered = np.full(len(rows), np.nan, np.float32)
        kernels.gather_matvec(qtype, w, rows, rounded[0], gathered)
        assert np.array_equal(gathered, out[rows])


def _ggml_cpu():
    """llama.cpp's CPU library from llama-cpp-python, initialised (its f16 tables), or a skip."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="ggml's own dot products come with llama-cpp-python")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    lib.ggml_cpu_init()
    return lib


# ggml's vec_dot for each type, the quantiser of its input (vec_dot_type) and that block's (values, bytes)
_GGML_DOT = {Q.Q5_0: ("q5_0_q8_0", "q8_0", (32, 34)), Q.Q5_1: ("q5_1_q8_1", "q8_1", (32, 36)),
             Q.Q2_K: ("q2_K_q8_K", "q8_K", (256, 292)), Q.Q3_K: ("q3_K_q8_K", "q8_K", (256, 292)),
             Q.Q4_K: ("q4_K_q8_K", "q8_K", (256, 292)), Q.Q5_K: ("q5_K_q8_K", "q8_K", (256, 292)),
             Q.Q6_K: ("q6_K_q8_K", "q8_K", (256, 292))}


@pytest.mark.parametrize("qtype, extreme", [pytest.param(q, False, id=q.name) for q in _GGML_DOT]
                         + [pytest.param(q, True, id=f"{q.name}-largest") for q in [*_QUANTS_FROM, *INTEGER_K]])
def test_dot_products_equal_ggml(qtype, extreme):
    """A model's mat-vec (loader.Matrix: x rounded as the type takes it, then the kernel) equals
    llama.cpp's own: ggml's quantiser of the input and its vec_dot, called in its library. "largest":
    every quant and sub-block scale at its largest, the input's quants at +-127, for the integer sums."""
    lib = _ggml_cpu()
    dot_name, quant_name, (block, size) = _GGML_DOT[qtype]
    vec_dot, quantize = getattr(lib, f"ggml_vec_dot_{dot_name}"), getattr(lib, f"quantize_row_{quant_name}")
    vec_dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    n_in = 1536
    w = weights(qtype, 23, n_in, seed=14)
    x = np.random.default_rng(15).standard_normal((1, n_in)).astype(np.float32)
    x[0, ::7] *= 20  # outliers, as in real activations
    if extreme and qtype in _QUANTS_FROM:
        w3 = w.reshape(23, n_in // 32, GGML_QUANT_SIZES[qtype][1])
        w3[:, :, _QUANTS_FROM[qtype]:] = 0xFF
        w3[::2, ::3, _QUANTS_FROM[qtype]:] = 0x00  # quants at 0 too: Q5_0's -16
        x = np.where(np.arange(n_in) % 3 == 0, -1.0, 1.0).astype(np.float32)[None]
    elif extreme:
        lo, hi = _SCALES[qtype]
        w3 = w.reshape(23, n_in // 256, GGML_QUANT_SIZES[qtype][1])
        w3[:, :, :lo] = w3[:, :, hi:] = 0xFF
        if qtype == Q.Q6_K:
            w3[:, :, 192:208] = 0x80  # int8 scales at -128
        x = np.where(np.arange(n_in) % 3 == 0, -1.0, 1.0).astype(np.float32)[None]
    xq = np.zeros(n_in // block * size, np.uint8)
    quantize(x.ctypes.data, xq.ctypes.data, n_in)
    s = np.zeros(1, np.float32)
    ggml = np.empty(23, np.float32)
    for r in range(23):
        vec_dot(n_in, s.ctypes.data, 0, w[r].ctypes.data, 0, xq.ctypes.data, 0, 1)
        ggml[r] = s[0]
    out = np.empty((1, 23), np.float32)
    Matrix(qtype, w, n_in, 23)(x, out)
    scale = np.abs(reference.dequantize(qtype, w)) @ np.abs(x[0])
    # Q5_1: ggml takes m times the block's input sum rounded to f16 (Q8_1's s), the kernel the exact sum
    tol = 1e-4 if qtype == Q.Q5_1 else 2e-6
    assert (np.abs(out[0] - ggml) <= tol * scale).all(), np.abs(out[0] - ggml) / scale

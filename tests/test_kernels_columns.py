"""The input-sparse mat-vec over the column layout (kernels.column_matrix, kernels.input_sparse_matvec)
against NumPy on gguf's dequantisation of the original blocks with x masked, and against the dense
kernels.matvec of the masked x: every input kept, some, none; row counts that are not a multiple of
16 or 32; the layout holding the file's numbers exactly; the same bits whatever the chunking."""

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import dequantize, quantize

from hybridinfer import kernels
from hybridinfer.kernels import columns, reference

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32]
SHAPES = [(70, 96), (1, 32), (33, 64), (160, 128)]  # n_out x n_in


def blocks(qtype, n_out, n_in, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_out, n_in)).astype(np.float32)
    return quantize(values, qtype).view(np.uint8).reshape(n_out, -1)


def masked(x, threshold):
    return np.where(np.abs(x) >= np.float32(threshold), x, np.float32(0)).astype(np.float32)


def expected(qtype, w, x):
    """W @ x as the kernels take it (x quantised to Q8_0 blocks for the integer types), in float64."""
    return reference.matvec(qtype, w, x)


def assert_matches(out, ref):
    """Equal to float rounding: within 1e-5 of the output's largest magnitude."""
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * scale)


def decode_layout(cm):
    """W [n_out, n_in] float32 read back from the column layout, in NumPy."""
    n_pad, stride, _, _ = columns.layout(int(cm.qtype), cm.n_out, cm.n_in)
    cols = cm.quants.reshape(cm.n_in, stride)
    if cm.qtype in (Q.F32, Q.F16, Q.BF16):
        dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[cm.qtype]
        values = cols[:, :n_pad * np.dtype(dtype).itemsize].view(dtype)
        if cm.qtype == Q.BF16:
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32).T[:cm.n_out]
    if cm.qtype == Q.Q8_0:
        q = cols[:, :n_pad].view(np.int8).astype(np.float32)
    else:  # byte 16g + k of a column: row 32g + k in its low nibble, 32g + 16 + k in its high one
        packed = cols[:, :n_pad // 2].reshape(cm.n_in, -1, 16)
        q = np.concatenate([packed & 15, packed >> 4], axis=2).reshape(cm.n_in, n_pad).astype(np.float32)
    d = np.repeat(cm.scales.view(np.float16).reshape(-1, n_pad).astype(np.float32), 32, axis=0)
    if cm.qtype == Q.Q4_0:
        values = d * (q - np.float32(8))
    elif cm.qtype == Q.Q4_1:
        values = d * q + np.repeat(cm.mins.view(np.float16).reshape(-1, n_pad).astype(np.float32), 32, axis=0)
    else:
        values = d * q
    return values.T[:cm.n_out]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_holds_the_files_numbers(qtype, shape):
    w = blocks(qtype, *shape)
    cm = kernels.column_matrix(qtype, w)
    assert (cm.qtype, cm.n_out, cm.n_in) == (qtype, *shape)
    np.testing.assert_array_equal(decode_layout(cm), dequantize(w, qtype).reshape(shape))
    n_pad = -(-shape[0] // 32) * 32  # the file's bytes, plus padding rows and under 128 bytes a column
    assert w.nbytes * n_pad // shape[0] <= cm.nbytes < w.nbytes * n_pad // shape[0] + 128 * shape[1]


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropped", [0.0, 0.5, 0.9, 1.0])
def test_matches_numpy_and_the_dense_matvec(qtype, shape, dropped):
    n_out, n_in = shape
    w = blocks(qtype, *shape)
    cm = kernels.column_matrix(qtype, w)
    x = np.random.default_rng(1).standard_normal(n_in).astype(np.float32)
    x[::7] = 0.0  # zeros contribute nothing, kept or not
    threshold = float(np.quantile(np.abs(x), dropped)) + (1.0 if dropped == 1.0 else 0.0) if dropped else 0.0
    out = np.full(n_out, np.nan, np.float32)
    kernels.input_sparse_matvec(cm, x, threshold, out)
    xm = masked(x, threshold)
    if dropped == 1.0:
        np.testing.assert_array_equal(out, np.zeros(n_out, np.float32))
    assert_matches(out, expected(qtype, w, xm))
    dense = np.empty(n_out, np.float32)
    kernels.matvec(qtype, w, xm, dense)
    assert_matches(out, dense)
    if not dropped:  # threshold 0 keeps every input: the dense mat-vec of x itself
        kernels.matvec(qtype, w, x, dense)
        assert_matches(out, dense)


def test_block_scale_is_that_of_the_kept_inputs():
    """Dropping a block's largest input changes its Q8_0 scale: the kept ones are quantised finer."""
    w = blocks(Q.Q8_0, 48, 64)
    cm = kernels.column_matrix(Q.Q8_0, w)
    x = np.full(64, 0.01, np.float32)
    x[5], x[40] = 100.0, -0.5
    out = np.empty(48, np.float32)
    kernels.input_sparse_matvec(cm, x, 0.3, out)  # drops the 0.01s; x[5] alone in its block
    assert_matches(out, expected(Q.Q8_0, w, masked(x, 0.3)))
    kernels.input_sparse_matvec(cm, x, 1.0, out)  # drops all but x[5]
    assert_matches(out, expected(Q.Q8_0, w, masked(x, 1.0)))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16])
def test_same_bits_whatever_the_chunking(qtype):
    """The same sums in the same order whatever the thread count: 1, 2, 3, 4 or 7 chunks give the same
    bits, and so do 1 and 2 threads through the facade."""
    n_out, n_in = 1000, 256
    w = blocks(qtype, n_out, n_in)
    cm = kernels.column_matrix(qtype, w)
    x = np.random.default_rng(2).standard_normal(n_in).astype(np.float32)
    threshold = np.float32(np.quantile(np.abs(x), 0.4))
    kernel = columns.input_sparse_matvec_for(int(qtype))
    results = []
    for n_chunks in (1, 2, 3, 4, 7):
        out = np.empty(n_out, np.float32)
        kernel(cm.quants, cm.scales, cm.mins, x, threshold, out, n_chunks)
        results.append(out)
    if numba.config.NUMBA_NUM_THREADS >= 2:
        before = kernels.get_threads()
        try:
            for n in (1, 2):
                kernels.set_threads(n)
                out = np.empty(n_out, np.float32)
                kernels.input_sparse_matvec(cm, x, float(threshold), out)
                results.append(out)
        finally:
            kernels.set_threads(before)
    for out in results[1:]:
        np.testing.assert_array_equal(out, results[0])


def test_same_bits_whatever_the_chunking_of_the_build():
    w = blocks(Q.Q4_1, 1000, 256)
    built = []
    for n_chunks in (1, 3):
        arrays = columns.allocate(int(Q.Q4_1), 1000, 256)
        columns.build_columns_for(int(Q.Q4_1))(kernels._readonly(w), *arrays, n_chunks)
        built.append(arrays)
    for a, b in zip(*built):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K])
def test_other_types_are_rounded_to_q8_0(qtype):
    """Types without a column form of their own become Q8_0: the mat-vec of those Q8_0 blocks."""
    n_out, n_in = 40, 256
    rng = np.random.default_rng(3)
    if qtype == Q.Q4_K:  # gguf cannot quantise K-quants: random bytes with small finite f16 scales
        block, size = GGML_QUANT_SIZES[qtype]
        w = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
        w[:, :, 0:4] = rng.uniform(-0.01, 0.01, (n_out, n_in // block, 2)).astype(np.float16).view(np.uint8)
        w = w.reshape(n_out, -1)
    else:
        w = blocks(qtype, n_out, n_in)
    cm = kernels.column_matrix(qtype, w)
    assert cm.qtype == Q.Q8_0
    q8 = quantize(dequantize(w, qtype).reshape(n_out, n_in), Q.Q8_0).view(np.uint8).reshape(n_out, -1)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.empty(n_out, np.float32)
    kernels.input_sparse_matvec(cm, x, 0.5, out)
    assert_matches(out, expected(Q.Q8_0, q8, masked(x, 0.5)))


def test_bad_arguments_raise():
    w = blocks(Q.Q4_0, 64, 96)
    cm = kernels.column_matrix(Q.Q4_0, w)
    x, out = np.zeros(96, np.float32), np.zeros(64, np.float32)
    read_only = np.zeros(64, np.float32)
    read_only.flags.writeable = False
    bad_calls = {
        "x too short": lambda: kernels.input_sparse_matvec(cm, x[:64], 0.0, out),
        "x float64": lambda: kernels.input_sparse_matvec(cm, x.astype(np.float64), 0.0, out),
        "x strided": lambda: kernels.input_sparse_matvec(cm, np.zeros(192, np.float32)[::2], 0.0, out),
        "out wrong size": lambda: kernels.input_sparse_matvec(cm, x, 0.0, out[:63]),
        "out read-only": lambda: kernels.input_sparse_matvec(cm, x, 0.0, read_only),
        "out overlaps x": lambda: kernels.input_sparse_matvec(cm, x, 0.0, x[:64]),
        "negative threshold": lambda: kernels.input_sparse_matvec(cm, x, -0.1, out),
        "NaN threshold": lambda: kernels.input_sparse_matvec(cm, x, float("nan"), out),
        "threshold a string": lambda: kernels.input_sparse_matvec(cm, x, "0.1", out),
        "not a ColumnMatrix": lambda: kernels.input_sparse_matvec((Q.Q4_0, w), x, 0.0, out),
        "n_in not a multiple of 32": lambda: kernels.column_matrix(Q.F32, np.zeros((4, 48 * 4), np.uint8)),
        "w not blocks": lambda: kernels.column_matrix(Q.Q4_0, np.zeros((4, 17), np.uint8)),
        "w float32": lambda: kernels.column_matrix(Q.F32, np.zeros((4, 32), np.float32)),
        "unsupported type": lambda: kernels.column_matrix(Q.IQ2_XXS, np.zeros((4, 66), np.uint8)),
        "arrays of another shape": lambda: kernels.ColumnMatrix(Q.Q4_0, 32, 96, cm.quants, cm.scales, cm.mins),
        "writable arrays": lambda: kernels.ColumnMatrix(Q.Q4_0, 64, 96, cm.quants.copy(), cm.scales, cm.mins),
        "a type without a column form": lambda: kernels.ColumnMatrix(Q.Q4_K, 64, 96, cm.quants, cm.scales, cm.mins),
    }
    for name, call in bad_calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for {name}")


def test_layout_arrays_are_read_only():
    cm = kernels.column_matrix(Q.Q8_0, blocks(Q.Q8_0, 8, 32))
    for a in (cm.quants, cm.scales, cm.mins):
        assert not a.flags.writeable
    assert cm.quants.ctypes.data % 64 == 0

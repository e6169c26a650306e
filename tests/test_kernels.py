"""The weight kernels (matvec, matmul, get_rows) against the gguf package's dequantisation."""

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import quantize

from hybridinfer import kernels
from hybridinfer.kernels import reference, simd

rng = np.random.default_rng(0)
FLOAT_TYPES = [Q.F32, Q.F16, Q.BF16]
QUANT_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K]


def weights(qtype: Q, n_out: int, n_in: int) -> np.ndarray:
    """uint8 (n_out, row_bytes) blocks of a random matrix, as a GGUF file holds them."""
    if qtype == Q.Q6_K:  # gguf cannot quantise Q6_K: random blocks with a sane f16 scale d
        w = rng.integers(0, 256, (n_out, n_in // 256, 210), dtype=np.uint8)
        w[:, :, 208:] = rng.uniform(-0.01, 0.01, (n_out, n_in // 256, 1)).astype(np.float16).view(np.uint8)
        return w.reshape(n_out, -1)
    values = rng.standard_normal((n_out, n_in)).astype(np.float32)
    return quantize(values, qtype).view(np.uint8).reshape(n_out, -1)


def shapes(qtype: Q) -> list[tuple[int, int]]:
    """(n_out, n_in): one row, n_out a multiple of nothing, n_in of one block and several;
    float types also n_in not a multiple of the 16 lanes."""
    block = max(GGML_QUANT_SIZES[qtype][0], 32)
    cases = [(1, block), (37, block), (5, 3 * block), (70, 2 * block)]
    if qtype in FLOAT_TYPES:
        cases += [(3, 17), (2, 5), (4, 33), (1, 1), (9, 47)]
    return cases


def assert_dots_close(out, qtype, w, x):
    """Each output within 1e-5 of its row's sum of |W[r, i] x[i]| from the reference (x: one vector or
    T rows, quantised first for the types with integer dot products, as the kernels do)."""
    x = np.atleast_2d(x)
    W = reference.dequantize(qtype, w).astype(np.float64)
    scale = np.abs(x.astype(np.float64)) @ np.abs(W).T  # [T, n_out]
    ref = reference.matmul(qtype, w, x)
    err = np.abs(np.atleast_2d(out) - ref)
    assert (err <= 1e-5 * scale + 1e-30).all(), f"max relative error {(err / (scale + 1e-30)).max():.2e}"


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
def test_matvec(qtype):
    for n_out, n_in in shapes(qtype):
        w, x = weights(qtype, n_out, n_in), rng.standard_normal(n_in).astype(np.float32)
        out = np.full(n_out, np.nan, np.float32)
        kernels.matvec(qtype, w, x, out)
        assert_dots_close(out, qtype, w, x)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("T", [1, 2, 3, 7])
def test_matmul(qtype, T):
    for n_out, n_in in shapes(qtype):
        w, x = weights(qtype, n_out, n_in), rng.standard_normal((T, n_in)).astype(np.float32)
        out = np.full((T, n_out), np.nan, np.float32)
        kernels.matmul(qtype, w, x, out)
        assert_dots_close(out, qtype, w, x)


@pytest.mark.parametrize("qtype", QUANT_TYPES + FLOAT_TYPES, ids=lambda q: q.name)
def test_get_rows(qtype):
    for n_out, n_in in shapes(qtype):
        w = weights(qtype, n_out, n_in)
        ids = np.array([n_out - 1, 0, n_out - 1, n_out // 2, 0], dtype=np.int32)  # repeated ids
        out = np.full((len(ids), n_in), np.nan, np.float32)
        kernels.get_rows(qtype, w, ids, out)
        ref = reference.get_rows(qtype, w, ids)
        # Q4_1 rounds once (fused q * d + m) where gguf rounds twice: within one ulp of the row max
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-7 * np.abs(ref).max())


def test_matmul_large_tile_and_many_tokens():
    """Several tiles per thread, tokens and rows not multiples of the 4 x 4 register block."""
    w, x = weights(Q.Q4_1, 203, 576), rng.standard_normal((13, 576)).astype(np.float32)
    out = np.empty((13, 203), np.float32)
    kernels.matmul(Q.Q4_1, w, x, out)
    assert_dots_close(out, Q.Q4_1, w, x)


def test_empty_inputs():
    w = weights(Q.Q8_0, 4, 32)
    kernels.matmul(Q.Q8_0, w, np.zeros((0, 32), np.float32), np.zeros((0, 4), np.float32))
    kernels.get_rows(Q.Q8_0, w, np.zeros(0, np.int64), np.zeros((0, 32), np.float32))


def test_memory_mapped_weights(tmp_path):
    """Read-only, memory-mapped blocks are read in place."""
    w = weights(Q.Q4_0, 9, 64)
    path = tmp_path / "w.bin"
    w.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=w.shape)
    x, out = rng.standard_normal(64).astype(np.float32), np.empty(9, np.float32)
    kernels.matvec(Q.Q4_0, mapped, x, out)
    assert_dots_close(out, Q.Q4_0, w, x)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_same_bits_whatever_the_thread_count():
    w = weights(Q.Q4_1, 1001, 576)
    x = rng.standard_normal((7, 576)).astype(np.float32)
    results = []
    before = kernels.get_threads()
    try:
        for n in (1, 2):
            kernels.set_threads(n)
            mv, mm = np.empty(1001, np.float32), np.empty((7, 1001), np.float32)
            kernels.matvec(Q.Q4_1, w, x[0], mv)
            kernels.matmul(Q.Q4_1, w, x, mm)
            results.append((mv, mm))
    finally:
        kernels.set_threads(before)
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("native", [True, False])
def test_half_to_float_every_bit_pattern(monkeypatch, native):
    """Both f16 decoders (hardware conversion and the integer fallback) are exact for all 65536
    patterns, subnormals, infinities and NaNs included."""
    monkeypatch.setattr(simd, "_NATIVE_HALF", native)

    @numba.njit  # compiled now, under the patched setting; not cached
    def decode_all(raw, out):
        for i in range(0, raw.shape[0], 32):
            simd.store_f32(out, i // 2, simd.half_to_f32(simd.load_u16(raw, i)))
        for i in range(0, raw.shape[0], 2):
            out[out.shape[0] // 2 + i // 2] = simd.load_f16(raw, i)

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(2 * 65536, np.float32)
    decode_all(bits.view(np.uint8), out)
    expected = bits.view(np.float16).astype(np.float32)
    for got in (out[:65536], out[65536:]):
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), expected[~nan].view(np.uint32))


@pytest.mark.parametrize("vnni", [True, False])
def test_byte_dot_products_exact(monkeypatch, vnni):
    """dot_u8_i8 (vpdpbusd, or the portable widening multiplies) sums unsigned x signed byte products
    exactly, extremes included; load_nibbles puts two Q4 blocks' values in order."""
    monkeypatch.setattr(simd, "_VNNI", vnni)

    @numba.njit  # compiled now, under the patched setting; not cached
    def dots(u, s, acc, out):
        for i in range(0, u.shape[0], 64):
            out_vec = simd.dot_u8_i8(simd.load_i32(acc, i // 4), simd.load_bytes(u, i, i + 32),
                                     simd.load_bytes(s, i, i + 32))
            simd.store_f32(out, i // 4, simd.to_f32(out_vec))

    @numba.njit
    def nibbles(a, i, j, out):
        v = simd.load_nibbles(a, i, j)
        simd.store_f32(out, 0, simd.to_f32(simd.dot_u8_i8(simd.load_i32(np.zeros(16, np.int32), 0), v,
                                                         simd.load_bytes(np.ones(64, np.int8), 0, 32))))

    u = np.concatenate([np.full(64, 255, np.uint8), rng.integers(0, 256, 192, dtype=np.uint8)])
    s = np.concatenate([np.full(64, -128, np.int8), rng.integers(-128, 128, 192, dtype=np.int8)])
    acc = rng.integers(-1000, 1000, 64, dtype=np.int32)
    out = np.empty(64, np.float32)
    dots(u, s, acc, out)
    expected = acc + (u.astype(np.int64) * s).reshape(64, 4).sum(axis=1)
    assert np.array_equal(out, expected.astype(np.float32))

    raw = rng.integers(0, 256, 40, dtype=np.uint8)
    nibbles(raw, 2, 21, out[:16])
    values = np.concatenate([raw[2:18] & 15, raw[2:18] >> 4, raw[21:37] & 15, raw[21:37] >> 4])
    assert np.array_equal(out[:16], values.reshape(16, 4).sum(axis=1).astype(np.float32))


def test_bad_input_raises_value_error():
    w, x, out = weights(Q.Q4_0, 8, 64), np.zeros(64, np.float32), np.zeros(8, np.float32)
    read_only = np.zeros(8, np.float32)
    read_only.setflags(write=False)

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    bad_calls = {
        "x too short": lambda: kernels.matvec(Q.Q4_0, w, x[:32], out),
        "x float64": lambda: kernels.matvec(Q.Q4_0, w, x.astype(np.float64), out),
        "out wrong shape": lambda: kernels.matvec(Q.Q4_0, w, x, np.zeros(7, np.float32)),
        "unsupported type": lambda: kernels.matvec(Q.TQ2_0, w, x, out),
        "row bytes not whole blocks": lambda: kernels.matvec(Q.Q4_0, w[:, :30].copy(), x, out),
        "w not uint8": lambda: kernels.matvec(Q.Q4_0, w.view(np.int8), x, out),
        "w 1-D": lambda: kernels.matvec(Q.Q4_0, w.reshape(-1), x, out),
        "w non-contiguous": lambda: kernels.matvec(Q.Q4_0, w[::2], x, out[:4]),
        "x non-contiguous": lambda: kernels.matvec(Q.Q4_0, w, np.zeros(128, np.float32)[::2], out),
        "out read-only": lambda: kernels.matvec(Q.Q4_0, w, x, read_only),
        "out overlaps x": lambda: kernels.matvec(Q.F32, np.zeros((64, 256), np.uint8), x, x),
        "matmul x wrong width": lambda: kernels.matmul(Q.Q4_0, w, zeros(3, 32), zeros(3, 8)),
        "matmul out wrong T": lambda: kernels.matmul(Q.Q4_0, w, zeros(3, 64), zeros(2, 8)),
        "matmul x non-contiguous": lambda: kernels.matmul(Q.Q4_0, w, zeros(3, 128)[:, ::2], zeros(3, 8)),
        "get_rows id too large": lambda: kernels.get_rows(Q.Q4_0, w, np.array([8]), zeros(1, 64)),
        "get_rows negative id": lambda: kernels.get_rows(Q.Q4_0, w, np.array([-1]), zeros(1, 64)),
        "get_rows float ids": lambda: kernels.get_rows(Q.Q4_0, w, np.array([1.0]), zeros(1, 64)),
        "get_rows out wrong shape": lambda: kernels.get_rows(Q.Q4_0, w, np.array([1, 2]), zeros(1, 64)),
        "threads zero": lambda: kernels.set_threads(0),
    }
    for name, call in bad_calls.items():
        try:
            call()
        except ValueError:
            continue
        pytest.fail(f"no ValueError for {name}")


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantize_equals_gguf_byte_for_byte(qtype):
    """kernels.quant.quantize against the gguf package on random rows, a zero block, equal values,
    values on rounding ties, tiny and huge scales, and a transposed (strided) input."""
    from hybridinfer.kernels import quant

    values = rng.standard_normal((40, 96)).astype(np.float32)
    values[0] = 0.0
    values[1, :32] = 0.5
    values[2] = np.round(values[2] * 4) / 4
    values[3, :32] = np.arange(32) - 16.0
    values[4] *= 1e-6
    values[5] *= 1e4
    for v in (values, np.ascontiguousarray(values[:, :64].T).T, values.T.copy().T):
        expected = quantize(np.ascontiguousarray(v), qtype).view(np.uint8).reshape(len(v), -1)
        assert np.array_equal(quant.quantize(v, qtype), expected)


def _attention_decoder(n_embd=64, n_head=4, n_kv=2, hd=16, n_ctx=8, wo_rows=64):
    def weight(n_out, n_in):
        return Q.F32, 0, np.zeros((n_out, n_in), np.float32).view(np.uint8)
    tables = np.zeros((n_ctx, hd // 2), np.float32)
    cache = np.zeros((n_kv, n_ctx, hd), np.float16)
    return kernels.AttentionDecoder(np.ones(n_embd, np.float32), 1e-5, weight(n_head * hd, n_embd),
                                    weight(n_kv * hd, n_embd), weight(n_kv * hd, n_embd), weight(wo_rows, n_head * hd),
                                    n_head, tables, tables, cache, cache.copy())


def test_attention_decoder_checks_shapes_once_and_positions_per_call():
    decoder = _attention_decoder()
    x = np.ones((1, 64), np.float32)
    decoder(x, 7)
    assert np.isfinite(x).all()
    with pytest.raises(ValueError, match="position 8 is outside the cache of 8"):
        decoder(x, 8)
    with pytest.raises(ValueError, match="x must be a float32 array of shape"):
        decoder(np.ones((1, 32), np.float32), 0)
    with pytest.raises(ValueError, match="attention output weight is 32 x 64, expected 64 x 64"):
        _attention_decoder(wo_rows=32)
    with pytest.raises(ValueError, match="do not fit together"):
        _attention_decoder(n_head=3)

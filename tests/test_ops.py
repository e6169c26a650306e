"""The block kernels (RMSNorm, RoPE, attention, FFN activation) against NumPy."""

import numpy as np
import pytest

from hybridinfer.kernels import ops

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def rope_reference(x, cos, sin):
    """Adjacent pairs rotated: x[T, heads, hd], cos/sin [T, n_rot]."""
    out, n = x.copy(), cos.shape[1]
    c, s = cos[:, None, :], sin[:, None, :]
    out[..., 0:2 * n:2] = x[..., 0:2 * n:2] * c - x[..., 1:2 * n:2] * s
    out[..., 1:2 * n:2] = x[..., 0:2 * n:2] * s + x[..., 1:2 * n:2] * c
    return out


def attention_reference(q, k_cache, v_cache, pos):
    T, n_head, hd = q.shape
    group = n_head // k_cache.shape[0]
    k = np.repeat(k_cache[:, :pos + T], group, axis=0)  # [n_head, L, hd]
    v = np.repeat(v_cache[:, :pos + T], group, axis=0)
    s = np.einsum("thd,hld->htl", q, k) / np.sqrt(hd)
    s[:, np.arange(pos + T)[None, :] > pos + np.arange(T)[:, None]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("htl,hld->thd", p, v)


def test_rms_norm():
    x, w, out = randn(3, 50), randn(50), np.zeros((3, 50), np.float32)
    ops.rms_norm(x, w, np.float32(1e-5), out)
    np.testing.assert_allclose(out, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T, n_rot", [(1, 16), (5, 16), (4, 8)])
def test_rope(T, n_rot):
    n_ctx, pos = 16, 3
    q, k = randn(T, 8, 32), randn(T, 2, 32)
    angles = np.outer(np.arange(n_ctx), 10000.0 ** (-np.arange(n_rot) / n_rot))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    q_ref, k_ref = rope_reference(q, cos[pos:pos + T], sin[pos:pos + T]), rope_reference(k, cos[pos:pos + T], sin[pos:pos + T])
    ops.rope(q, k, pos, cos, sin)
    np.testing.assert_allclose(q, q_ref, atol=1e-5)
    np.testing.assert_allclose(k, k_ref, atol=1e-5)


@pytest.mark.parametrize("T, pos", [(1, 0), (1, 9), (5, 3), (16, 0)])
def test_attention(T, pos):
    n_head, n_kv, hd, n_ctx = 8, 2, 32, 16
    q = randn(T, n_head, hd)
    k_cache, v_cache = randn(n_kv, n_ctx, hd).astype(np.float16), randn(n_kv, n_ctx, hd).astype(np.float16)
    k_cache[0, 0, :3] = 6e-8, -3e-6, 60000  # subnormals and the largest values read exactly too
    out = np.zeros((T, n_head, hd), np.float32)
    ops.attention(q, k_cache.view(np.uint16), v_cache.view(np.uint16), pos, out, np.zeros((n_head, n_ctx), np.float32))
    expected = attention_reference(q, k_cache.astype(np.float32), v_cache.astype(np.float32), pos)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("n", [5, 16, 37])  # the scalar tail alone, whole 16-lane vectors, both
def test_store_half_rounded_equals_numpy_cast(n):
    """The decode kernel's cache write gives the bits NumPy's f16 cast (the prefill's write) gives,
    beyond f16's range (inf), at ties, for subnormals, signed zeros and NaN."""
    special = np.array([65504, 65519.9, 65520, -1e6, np.inf, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -25,
                        3 * 2 ** -26, 1e-7, -0.0, -1e-9, np.nan], np.float32)
    src = (randn(n) * np.exp(3 * randn(n))).astype(np.float32)
    src[:len(special)] = special[:n]
    src = np.roll(src, n // 3)  # the special values in the vectors and the tail
    dst = np.zeros(n, np.uint16)
    ops.store_half_rounded(src, dst)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(dst, src.astype(np.float16).view(np.uint16))


def test_half_bits_equals_numpy_cast():
    """The scalar write (the tail of a row; whole rows where the CPU has no f16 conversion) on every
    finite half, the midpoints between neighbours (ties to even) and values just off them."""
    from numba import njit

    @njit
    def half_bits(x, out):
        for i in range(x.shape[0]):
            out[i] = ops._half_bits(x[i])

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float32))  # -0.0 and 0.0 included
    mid = (finite[:-1] + finite[1:]) / 2  # exact in f32
    x = np.concatenate([finite, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
                        [65520, 1e6, -3.4e38, np.inf, -np.inf]]).astype(np.float32)
    out = np.zeros(len(x), np.uint16)
    half_bits(x, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))
    half_bits(np.array([np.nan], np.float32), out[:1])
    assert np.isnan(out[:1].view(np.float16)).all()


@pytest.mark.parametrize("kind, threshold, act", [
    (ops.SILU, 0.0, lambda g: g / (1 + np.exp(-g))),
    (ops.RELU, 0.0, lambda g: np.maximum(g, 0)),
    (ops.FATRELU, 0.5, lambda g: np.where(g >= 0.5, g, 0)),
    (ops.DRELU, 0.0, lambda g: np.maximum(g, 0)),
])
def test_ffn_activation(kind, threshold, act):
    gate, up = randn(3, 40), randn(3, 40)
    expected = act(gate) * (np.maximum(up, 0) if kind == ops.DRELU else up)
    ops.ffn_activation(gate, up, kind, np.float32(threshold))
    np.testing.assert_allclose(gate, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16", "BF16", "Q6_K", "F32"])
def test_round_for_dot_matches_numpy(qtype):
    """ggml's rounding of a mat-vec input, against gguf's Q8_0 quantizer and NumPy's casts."""
    from gguf import GGMLQuantizationType as Q
    from llama_reference import round_input
    x = (randn(3, 512) * np.exp(2 * randn(3, 512))).astype(np.float32)
    x[1, :32] = 0.0  # an all-zero block
    x[2, 5] = 1e-7  # an f16 subnormal
    out = np.full_like(x, np.nan)
    ops.round_for_dot(ops.DOT_ROUNDING[Q[qtype]], x, out)
    if qtype == "BF16":
        bits = x.view(np.uint32)
        expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    else:
        expected = round_input(x, Q[qtype])
    np.testing.assert_array_equal(out, expected)

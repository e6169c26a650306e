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
    q, k_cache, v_cache = randn(T, n_head, hd), randn(n_kv, n_ctx, hd), randn(n_kv, n_ctx, hd)
    out = np.zeros((T, n_head, hd), np.float32)
    ops.attention(q, k_cache, v_cache, pos, out, np.zeros((n_head, n_ctx), np.float32))
    np.testing.assert_allclose(out, attention_reference(q, k_cache, v_cache, pos), atol=1e-5)


@pytest.mark.parametrize("kind, threshold, act", [
    (ops.SILU, 0.0, lambda g: g / (1 + np.exp(-g))),
    (ops.RELU, 0.0, lambda g: np.maximum(g, 0)),
    (ops.FATRELU, 0.5, lambda g: np.where(g >= 0.5, g, 0)),
])
def test_ffn_activation(kind, threshold, act):
    gate, up = randn(3, 40), randn(3, 40)
    expected = act(gate) * up
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

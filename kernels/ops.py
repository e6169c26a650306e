"""Numba kernels for the non-weight steps of a block: RMSNorm, RoPE, attention,
the FFN activation. Plain functions over float32 arrays with an `out` argument; the NumPy
references live in tests/llama_reference.py and tests/test_ops.py."""

import math

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from hybridinfer.kernels.config import HELPER, KERNEL, SERIAL_KERNEL
from hybridinfer.kernels.simd import LANES, NATIVE_HALF, half_to_f32, load_f32, store_half

SILU, RELU, FATRELU, DRELU = 0, 1, 2, 3  # DRELU: relu(gate) * relu(up) (TurboSparse)


@njit(**SERIAL_KERNEL)
def rms_norm(x, weight, eps, out):
    """out[T, n] = x[T, n] / sqrt(mean(x^2) + eps) * weight[n]; all float32."""
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for i in range(x.shape[1]):
            ss += x[t, i] * x[t, i]
        scale = np.float32(1.0) / np.sqrt(ss / x.shape[1] + eps)
        for i in range(x.shape[1]):
            out[t, i] = x[t, i] * scale * weight[i]


@njit(**SERIAL_KERNEL)
def rope(q, k, pos, cos, sin):
    """RoPE (GGML normal mode: adjacent pairs) in place on q[T, n_head, hd] and k[T, n_kv, hd] at
    positions pos..pos+T-1; cos, sin: [n_ctx, rope_dim / 2] float32."""
    n_rot = cos.shape[1]
    for t in range(q.shape[0]):
        p = pos + t
        for x in (q[t], k[t]):
            for h in range(x.shape[0]):
                for i in range(n_rot):
                    x0, x1 = x[h, 2 * i], x[h, 2 * i + 1]
                    x[h, 2 * i] = x0 * cos[p, i] - x1 * sin[p, i]
                    x[h, 2 * i + 1] = x0 * sin[p, i] + x1 * cos[p, i]


@njit(**KERNEL)
def attention(q, k_cache, v_cache, pos, out, scores):
    """Causal grouped-query attention. q[T, n_head, hd] at positions pos..pos+T-1 attends to cache
    positions 0..its own; k_cache, v_cache [n_kv, n_ctx, hd] uint16, the f16 cache's bits
    (.view(np.uint16)), read exactly as float32; out[T, n_head, hd]; scores: scratch [n_head, n_ctx].
    One thread per head, the same order whatever the thread count."""
    T, n_head, hd = q.shape
    group = n_head // k_cache.shape[0]
    scale = np.float32(1.0 / np.sqrt(hd))
    for h in prange(n_head):
        kv = h // group
        s = scores[h]
        for t in range(T):
            n = pos + t + 1
            peak = np.float32(-np.inf)
            for j in range(n):
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += q[t, h, d] * half_to_f32(k_cache[kv, j, d])
                s[j] = acc * scale
                peak = max(peak, s[j])
            total = np.float32(0.0)
            for j in range(n):
                s[j] = np.exp(s[j] - peak)
                total += s[j]
            o = out[t, h]
            o[:] = 0.0
            for j in range(n):
                w = s[j] / total
                for d in range(hd):
                    o[d] += w * half_to_f32(v_cache[kv, j, d])


@njit(**SERIAL_KERNEL, inline="always")
def act(g, kind, threshold):
    """The FFN activation of one gate value g: SILU, RELU (and DRELU's gate) or FATRELU (keeps g >= threshold)."""
    if kind == SILU:
        return g / (np.float32(1.0) + np.exp(-g))
    if kind == RELU or kind == DRELU:
        return max(g, np.float32(0.0))
    return g if g >= threshold else np.float32(0.0)


@njit(**SERIAL_KERNEL, inline="always")
def gated(g, u, kind, threshold):
    """A neuron's activation from its gate and up values: act(g) * u, and relu(g) * relu(u) for DRELU."""
    if kind == DRELU:
        return max(g, np.float32(0.0)) * max(u, np.float32(0.0))
    return act(g, kind, threshold) * u


@njit(**SERIAL_KERNEL)
def ffn_activation(gate, up, kind, threshold):
    """gate[T, n_ff] <- gated(gate, up) in place: act(gate) * up[T, n_ff] for SILU, RELU or FATRELU
    (keeps g >= threshold), relu(gate) * relu(up) for DRELU."""
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            gate[t, i] = gated(gate[t, i], up[t, i], kind, threshold)


@njit(**SERIAL_KERNEL)
def activation(x, kind, threshold):
    """x[n] <- act(x) in place (no up factor): the activation whose zeros sparse modes skip."""
    for i in range(x.shape[0]):
        x[i] = act(x[i], kind, threshold)


@njit(**SERIAL_KERNEL)
def nonzero(x, idx):
    """Write the indices of the non-zero entries of x[n] into idx[n] int32, ascending; return their count."""
    n = 0
    for i in range(x.shape[0]):
        if x[i] != 0:
            idx[n] = i
            n += 1
    return n


# How ggml rounds a mat-vec's input before its dot products (the weight type's "vec_dot_type"):
# Q8_0 blocks of 32 (for Q4_0, Q4_1 and Q8_0 weights, whose kernels quantise x themselves; Q8_1 adds
# only a stored sum), the same blocks rounded by the caller as floats too (Q5_0, Q5_1: the CPU kernels
# re-quantise them to the same quants, the GPU's take the floats),
# Q8_K blocks of 256 (the K-quants), f16 (F16), bf16 (BF16), none (F32). Emulating it keeps greedy
# tokens equal to llama.cpp's.
ROUND_NONE, ROUND_Q8_0, ROUND_Q8_K, ROUND_F16, ROUND_BF16, ROUND_Q8_0_VALUES = 0, 1, 2, 3, 4, 5
DOT_ROUNDING = {Q.F32: ROUND_NONE, Q.F16: ROUND_F16, Q.BF16: ROUND_BF16, Q.Q8_0: ROUND_Q8_0,
                Q.Q4_0: ROUND_Q8_0, Q.Q4_1: ROUND_Q8_0, Q.Q5_0: ROUND_Q8_0_VALUES, Q.Q5_1: ROUND_Q8_0_VALUES,
                Q.Q2_K: ROUND_Q8_K, Q.Q3_K: ROUND_Q8_K, Q.Q4_K: ROUND_Q8_K, Q.Q5_K: ROUND_Q8_K,
                Q.Q6_K: ROUND_Q8_K}


@njit(**HELPER)
def _round_mantissa(v, bits, min_exp):
    """v rounded to nearest-even with `bits` explicit mantissa bits, no finer than 2**(min_exp - bits - 1)."""
    if v == 0.0:
        return np.float32(0.0)
    _, e = math.frexp(v)
    ulp = math.ldexp(1.0, max(e, min_exp) - bits - 1)
    return np.float32(np.rint(v / ulp) * ulp)


@njit(**HELPER)
def _q8_scale(x, b, block, f16_scale):
    """(d, inv) of the block x[b:b+block], ggml's quantize_row_q8_0 (f16 scale from the largest
    magnitude) or quantize_row_q8_K (signed f32 scale): its values are q = min(127, rint(x * inv)),
    meaning d * q. Both zero for a block of zeros."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for i in range(b, b + block):
        if abs(x[i]) > amax:
            amax, vmax = abs(x[i]), x[i]
    if amax == 0.0:
        return np.float32(0.0), np.float32(0.0)
    if f16_scale:
        d = amax / np.float32(127.0)
        return _round_mantissa(d, 10, -13), np.float32(1.0) / d
    inv = np.float32(-127.0) / vmax
    return np.float32(1.0) / inv, inv


@njit(**HELPER)
def _round_q8_blocks(x, out, block, f16_scale):
    """out = x rounded to 8-bit blocks of `block` values, as floats d * q (see _q8_scale)."""
    for b in range(0, x.shape[0], block):
        d, inv = _q8_scale(x, b, block, f16_scale)
        for i in range(b, b + block):
            out[i] = d * min(np.float32(127.0), np.rint(x[i] * inv))


@njit(**HELPER)
def quantize_q8_0(x, offset, xq, xd, xs, bias):
    """x f32[n] (n a multiple of 32) as ggml's Q8_0 / Q8_1 blocks, for integer dot products:
    xq int8 quants, xd f32 block scales (f16-rounded), xs f32 block sums d * sum(q) (Q8_1's s, kept in
    f32 where ggml rounds it to f16), bias int32 = -offset * each 4-quant sum (offset 8, 16 or 128 turns
    the unsigned weight bytes of Q4_0, Q5_0 / flipped Q8_0 back into signed values inside dot_u8_i8).
    The arrays may be longer than n's blocks (padding to whole pairs of blocks): the rest is zeroed."""
    n_blocks = x.shape[0] // 32
    for b in range(n_blocks):
        d, inv = _q8_scale(x, 32 * b, 32, True)
        total = 0
        for i in range(32 * b, 32 * b + 32):
            q = np.int32(min(np.float32(127.0), np.rint(x[i] * inv)))
            xq[i] = q
            total += q
        for g in range(8 * b, 8 * b + 8):
            bias[g] = -offset * (np.int32(xq[4 * g]) + xq[4 * g + 1] + xq[4 * g + 2] + xq[4 * g + 3])
        xd[b] = d
        xs[b] = d * np.float32(total)
    xq[32 * n_blocks:] = 0
    xd[n_blocks:] = 0.0
    xs[n_blocks:] = 0.0
    bias[8 * n_blocks:] = 0



@njit(**HELPER)
def quantize_q8_k(x, offset, xq, xd, bsums, bias):
    """x f32[n] (n a multiple of 256) as ggml's Q8_K blocks, for integer dot products with K-quants,
    if x is already rounded to them (ROUND_Q8_K, as callers round a K-quant mat-vec's input): xq int8
    quants, xd f32 block scales, bsums f32 sums of each 16 quants (exact: whole numbers below 2**12),
    bias int32 = -offset * each 4-quant sum (offset 32 turns Q6_K's unsigned quants back into signed
    values inside dot_u8_i8). Returns whether x was on that grid: every x * inv within 2**-10 of its
    whole quant (a rounded x re-quantises to the same quants, its scale within a few ulp; an unrounded
    one leaves the arrays partly written and is taken as floats)."""
    for b in range(x.shape[0] // 256):
        d, inv = _q8_scale(x, 256 * b, 256, False)
        for i in range(256 * b, 256 * b + 256):
            t = x[i] * inv
            q = min(np.float32(127.0), np.rint(t))
            if not abs(t - q) <= np.float32(2.0 ** -10):  # NaN too: taken as floats, it stays NaN
                return False
            xq[i] = np.int32(q)
        for g in range(16 * b, 16 * b + 16):
            total = 0
            for i in range(16 * g, 16 * g + 16):
                total += np.int32(xq[i])
            bsums[g] = total
        for g in range(64 * b, 64 * b + 64):
            bias[g] = -offset * (np.int32(xq[4 * g]) + xq[4 * g + 1] + xq[4 * g + 2] + xq[4 * g + 3])
        xd[b] = d
    return True

@njit(**HELPER)
def _half_bits(v):
    """The IEEE half bits of float32 v, as NumPy's astype(np.float16) gives them: nearest, ties to even,
    magnitudes from 65520 up infinity, NaN a quiet NaN."""
    if v != v:
        return np.uint16(0x7E00)
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(_round_mantissa(v, 10, -13))
    if a > 65504.0:
        return np.uint16(sign | 0x7C00)
    if a < 2.0 ** -14:  # subnormal or zero: a whole number of 2**-24
        return np.uint16(sign | int(a * 2.0 ** 24))
    m, e = math.frexp(a)  # a = (1 + mantissa / 1024) * 2**(e - 1)
    return np.uint16(sign | ((e + 14) << 10) | (int(m * 2048.0) - 1024))


@njit(**HELPER)
def store_half_rounded(src, dst):
    """dst[n] uint16 = the IEEE half bits of src[n] f32 (nearest, ties to even): a row of the f16 cache."""
    n = src.shape[0] // LANES * LANES if NATIVE_HALF else 0
    for i in range(0, n, LANES):
        store_half(dst, i, load_f32(src, i))
    for i in range(n, src.shape[0]):
        dst[i] = _half_bits(src[i])


@njit(**SERIAL_KERNEL)
def round_for_dot(kind, x, out):
    """out[T, n] f32 = x[T, n] rounded as ggml rounds a mat-vec input of this kind (ROUND_*); n a
    multiple of the block (32 for Q8_0, 256 for Q8_K)."""
    for t in range(x.shape[0]):
        if kind == ROUND_Q8_0 or kind == ROUND_Q8_0_VALUES:
            _round_q8_blocks(x[t], out[t], 32, True)
        elif kind == ROUND_Q8_K:
            _round_q8_blocks(x[t], out[t], 256, False)
        elif kind == ROUND_F16:
            for i in range(x.shape[1]):
                out[t, i] = _round_mantissa(x[t, i], 10, -13)
        elif kind == ROUND_BF16:
            for i in range(x.shape[1]):
                out[t, i] = _round_mantissa(x[t, i], 7, -125)
        else:
            for i in range(x.shape[1]):
                out[t, i] = x[t, i]

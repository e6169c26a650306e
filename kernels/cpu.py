"""Numba CPU kernels over GGUF weight blocks, read in place.

Each format is one small decode function ``_decode_<format>(row, g) -> F32x16``: the values
[16g, 16g+16) of one weight row (a uint8 1-D view of the row's blocks), as ``q * d + m``, one fused
multiply-add per lane. The row loops (``_dot_rows``, ``_dequant_rows``) are written once and call
``decode(fmt, row, g)``, the format table. The format is a compile-time constant throughout (a
Literal[int]): the kernels are generic in fmt, and Python calls the cached dispatcher made for one
format (``matvec_for(code)``), so that a run compiles each kernel only for the formats its model
uses, with only that format's decode in its loops.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights take their input as ggml does: quantised to 8-bit blocks of
32 (Q8_0, Q8_1's sums for Q4_1 and Q5_1), once per call, and mat-vecs take integer dot products of
weight and input bytes per pair of blocks (``dot_row_q8``) where other types decode to floats
(``dot_row``). Q4_K, Q5_K and Q6_K do the same against Q8_K blocks of 256 (``dot_row_q8k``) when
their input comes rounded to Q8_K, as callers round it (ops.DOT_ROUNDING): the same quants, exact
integer sums per super-block, as ggml's vec_dot; an input off that grid is taken as floats, as given.

Callers (kernels/__init__.py) validate shapes, dtypes and contiguity: nothing here checks bounds.
"""

import functools

import numpy as np
from gguf import GGMLQuantizationType as _T
from numba import njit, prange, types
from numba.extending import overload

from .config import HELPER, KERNEL, PARALLEL, SERIAL_KERNEL, SHARED_PARALLEL
from .ops import ROUND_Q8_0, quantize_q8_0, quantize_q8_k, round_for_dot
from .simd import (LANES, bits_to_f32, dot_u8_i8, flip_sign, half_to_f32, halves, hsum, int_zeros,
                   load_bytes, load_f16, load_f32, load_i8, load_i32, load_nibbles, load_u8, load_u16, load_u32,
                   nibble_halves, nibbles, prefetch, spread_i8, store_f32, to_f32, with_fifth_bits, with_high_bits,
                   zeros)

_F32, _F16, _BF16 = int(_T.F32), int(_T.F16), int(_T.BF16)
_Q8_0, _Q4_0, _Q4_1, _Q6_K = int(_T.Q8_0), int(_T.Q4_0), int(_T.Q4_1), int(_T.Q6_K)
_Q5_0, _Q5_1, _Q2_K, _Q3_K, _Q4_K, _Q5_K = (int(_T.Q5_0), int(_T.Q5_1), int(_T.Q2_K), int(_T.Q3_K), int(_T.Q4_K),
                                            int(_T.Q5_K))
_LANE = np.arange(LANES, dtype=np.uint8)  # lane numbers, the shifts that spread a bit mask over the lanes


# ---- one decode function per format: (row uint8[row_bytes], group g) -> F32x16 -----------------

@njit(**HELPER)
def _decode_f32(row, g):
    return bits_to_f32(load_u32(row, g * 64))


@njit(**HELPER)
def _decode_f16(row, g):
    return half_to_f32(load_u16(row, g * 32))


@njit(**HELPER)
def _decode_bf16(row, g):
    return bits_to_f32(load_u16(row, g * 32) << 16)


@njit(**HELPER)
def _decode_q8_0(row, g):
    # block of 32: f16 d, int8 q[32]; value = d * q
    o = (g >> 1) * 34
    return to_f32(load_i8(row, o + 2 + (g & 1) * 16)) * load_f16(row, o)


@njit(**HELPER)
def _decode_q4_0(row, g):
    # block of 32: f16 d, 16 bytes whose low nibbles are values 0-15, high nibbles 16-31;
    # value = d * (q - 8)
    o = (g >> 1) * 18
    q = (load_u8(row, o + 2) >> ((g & 1) * 4)) & 15
    d = load_f16(row, o)
    return to_f32(q) * d - np.float32(8) * d  # one fused multiply-add per lane


@njit(**HELPER)
def _decode_q4_1(row, g):
    # block of 32: f16 d, f16 m, nibbles as Q4_0; value = d * q + m
    o = (g >> 1) * 20
    q = (load_u8(row, o + 4) >> ((g & 1) * 4)) & 15
    return to_f32(q) * load_f16(row, o) + load_f16(row, o + 2)


@njit(**HELPER)
def _decode_q6_k(row, g):
    # super-block of 256 (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16] (one
    # per 16 values), f16 d; value = d * scale * (q - 32). Each half of 128 values uses 64 bytes
    # of ql and 32 of qh; its quarter k (32 values) takes ql nibble k >> 1 and qh bits 2k, 2k+1.
    o = (g >> 4) * 210
    half = (g >> 3) & 1
    j = g & 7
    k = j >> 1
    l0 = (j & 1) * 16
    ql = (load_u8(row, o + half * 64 + (k & 1) * 32 + l0) >> ((k >> 1) * 4)) & 15
    qh = (load_u8(row, o + 128 + half * 32 + l0) >> (2 * k)) & 3
    scale = load_f16(row, o + 208) * np.float32(np.int8(row[o + 192 + half * 8 + j]))
    return to_f32(ql | (qh << 4)) * scale - np.float32(32) * scale


@njit(**HELPER)
def _high_bits(row, i):
    """I32x16 of 16 one-bit values, bits 0-15 of the little-endian uint16 at row[i:i+2], as 0 or 16:
    the fifth bit of Q5_0 / Q5_1 quants."""
    mask = np.int32(row[i]) | (np.int32(row[i + 1]) << 8)
    return ((mask >> load_u8(_LANE, 0)) & 1) << 4


@njit(**HELPER)
def _decode_q5_0(row, g):
    # block of 32 (22 bytes): f16 d, uint32 qh (bit j: the fifth bit of value j), nibbles as Q4_0;
    # value = d * (q - 16)
    o = (g >> 1) * 22
    h = g & 1
    q = ((load_u8(row, o + 6) >> (h * 4)) & 15) | _high_bits(row, o + 2 + 2 * h)
    d = load_f16(row, o)
    return to_f32(q) * d - np.float32(16) * d


@njit(**HELPER)
def _decode_q5_1(row, g):
    # block of 32 (24 bytes): f16 d, f16 m, uint32 qh, nibbles as Q4_0; value = d * q + m
    o = (g >> 1) * 24
    h = g & 1
    q = ((load_u8(row, o + 8) >> (h * 4)) & 15) | _high_bits(row, o + 4 + 2 * h)
    return to_f32(q) * load_f16(row, o) + load_f16(row, o + 2)


@njit(**HELPER)
def _scale_min_k4(row, s, j):
    """(scale, min) 6-bit codes of sub-block j < 8 of a Q4_K / Q5_K super-block whose 12 scale bytes
    start at row[s] (ggml's get_scale_min_k4)."""
    if j < 4:
        return np.int32(row[s + j] & 63), np.int32(row[s + j + 4] & 63)
    return (np.int32((row[s + j + 4] & 15) | ((row[s + j - 4] >> 6) << 4)),
            np.int32((row[s + j + 4] >> 4) | ((row[s + j] >> 6) << 4)))


@njit(**HELPER)
def _decode_q4_k(row, g):
    # super-block of 256 (144 bytes): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8
    # sub-blocks of 32, qs[128]; sub-block j takes the low (j even) or high nibbles of qs[32(j >> 1):]+32;
    # value = d * scale_j * q - dmin * min_j
    o = (g >> 4) * 144
    j = (g >> 1) & 7
    sc, mn = _scale_min_k4(row, o + 4, j)
    q = (load_u8(row, o + 16 + (j >> 1) * 32 + (g & 1) * 16) >> ((j & 1) * 4)) & 15
    return to_f32(q) * (load_f16(row, o) * np.float32(sc)) - load_f16(row, o + 2) * np.float32(mn)


@njit(**HELPER)
def _decode_q5_k(row, g):
    # super-block of 256 (176 bytes): as Q4_K with qh[32] before qs[128]: bit j of qh[l] is the fifth
    # bit of value l of sub-block j
    o = (g >> 4) * 176
    j = (g >> 1) & 7
    l0 = (g & 1) * 16
    sc, mn = _scale_min_k4(row, o + 4, j)
    q = (load_u8(row, o + 48 + (j >> 1) * 32 + l0) >> ((j & 1) * 4)) & 15
    q = q | (((load_u8(row, o + 16 + l0) >> j) & 1) << 4)
    return to_f32(q) * (load_f16(row, o) * np.float32(sc)) - load_f16(row, o + 2) * np.float32(mn)


@njit(**HELPER)
def _decode_q2_k(row, g):
    # super-block of 256 (84 bytes): scales[16] (low nibble the scale, high the min of group g),
    # qs[64], f16 d, f16 dmin; group g takes bits 2k, 2k+1 (k = (g >> 1) & 3) of 16 bytes of its
    # half's 32; value = d * scale * q - dmin * min
    o = (g >> 4) * 84
    gi = g & 15
    s = np.int32(row[o + gi])
    q = (load_u8(row, o + 16 + (gi >> 3) * 32 + (gi & 1) * 16) >> (((gi >> 1) & 3) * 2)) & 3
    return to_f32(q) * (load_f16(row, o + 80) * np.float32(s & 15)) - load_f16(row, o + 82) * np.float32(s >> 4)


@njit(**HELPER)
def _decode_q3_k(row, g):
    # super-block of 256 (110 bytes): hmask[32], qs[64] (2-bit quants placed as Q2_K's), 12 bytes of
    # 6-bit scales (low 4 bits from bytes 0-7, high 2 from bytes 8-11), f16 d; bit g >> 1 of hmask[l]
    # clear subtracts 4; value = d * (scale - 32) * q
    o = (g >> 4) * 110
    gi = g & 15
    l0 = (gi & 1) * 16
    low = (row[o + 96 + (gi & 7)] >> ((gi >> 3) * 4)) & 15
    high = (row[o + 104 + (gi & 3)] >> ((gi >> 2) * 2)) & 3
    q = (load_u8(row, o + 32 + (gi >> 3) * 32 + l0) >> (((gi >> 1) & 3) * 2)) & 3
    q = q + (((load_u8(row, o + l0) >> (gi >> 1)) & 1) << 2) - 4
    return to_f32(q) * (load_f16(row, o + 108) * np.float32(np.int32(low | (high << 4)) - 32))


def decode(fmt, row, g):
    """The format table: values [16g, 16g+16) of a row of type fmt, as F32x16.

    For kernels only, with fmt a compile-time constant (a Literal[int]): the overload below picks
    that format's decode function while numba types the caller, so that only its code compiles
    (numba does not prune an if-chain on a literal argument; every format's decoder compiled into each).
    """
    raise TypeError("decode is called from numba kernels only")


_DECODERS = {_Q4_0: _decode_q4_0, _Q4_1: _decode_q4_1, _Q8_0: _decode_q8_0, _Q5_0: _decode_q5_0,
             _Q5_1: _decode_q5_1, _Q2_K: _decode_q2_k, _Q3_K: _decode_q3_k, _Q4_K: _decode_q4_k,
             _Q5_K: _decode_q5_k, _Q6_K: _decode_q6_k, _F16: _decode_f16, _BF16: _decode_bf16, _F32: _decode_f32}


@overload(decode, prefer_literal=True, inline="always")
def _decode_format(fmt, row, g):
    if isinstance(fmt, types.IntegerLiteral) and fmt.literal_value in _DECODERS:
        decoder = _DECODERS[fmt.literal_value]
        return lambda fmt, row, g: decoder(row, g)
    return None  # not a compile-time format: a typing error


@njit(inline="always", **HELPER)
def copy(src, i, dst, j, n):
    """dst[j:j + n] = src[i:i + n], as a loop: numba's slice assignment brings its shape-mismatch error
    message, whose string formatting was most of the machine code of the kernels that copy tails."""
    for k in range(n):
        dst[j + k] = src[i + k]


# ---- row loops, generic in the format -----------------------------------------------------------

@njit(inline="always", **HELPER)
def dot_row(fmt, row, x, wbuf, xbuf):
    """dot(row, x) of one weight row (uint8 blocks of format fmt) with x f32[n_in].

    Two accumulators of 16 lanes (even and odd groups), summed once. wbuf uint8[64] and xbuf
    f32[16] hold the last n_in % 16 values (xbuf preloaded with x's tail by the caller).
    (Two rows at a time, sharing the x loads, was 5-10% faster on matrices in cache but 20% slower
    on streamed ones.)
    """
    n_in = x.shape[0]
    n_groups = n_in // LANES
    tail_bytes = (n_in - n_groups * LANES) * (row.shape[0] // n_in)
    acc0 = zeros()
    acc1 = zeros()
    for p in range(n_groups >> 1):
        g = 2 * p
        acc0 = acc0 + decode(fmt, row, g) * load_f32(x, g * LANES)
        acc1 = acc1 + decode(fmt, row, g + 1) * load_f32(x, g * LANES + LANES)
    if n_groups & 1:
        g = n_groups - 1
        acc0 = acc0 + decode(fmt, row, g) * load_f32(x, g * LANES)
    if tail_bytes:
        copy(row, row.shape[0] - tail_bytes, wbuf, 0, tail_bytes)
        acc1 = acc1 + decode(fmt, wbuf, 0) * load_f32(xbuf, 0)
    return hsum(acc0 + acc1)


@njit(**HELPER)
def tail_buffers(x):
    """The scratch dot_row needs for x: (wbuf, xbuf with x's last n_in % 16 values)."""
    n_head = x.shape[0] // LANES * LANES
    xbuf = np.zeros(LANES, np.float32)
    copy(x, n_head, xbuf, 0, x.shape[0] - n_head)
    return np.zeros(4 * LANES, np.uint8), xbuf


@njit(**HELPER)
def integer_dot(fmt):
    """Whether weights of type fmt take integer dot products with a quantised input (dot_row_q8)."""
    return fmt == _Q4_0 or fmt == _Q4_1 or fmt == _Q5_0 or fmt == _Q5_1 or fmt == _Q8_0


@njit(**HELPER)
def q8k_dot(fmt):
    """Whether weights of type fmt take integer dot products with an input on the Q8_K grid (dot_row_q8k)."""
    return fmt == _Q4_K or fmt == _Q5_K or fmt == _Q6_K


@njit(**HELPER)
def q8_input(fmt, x):
    """x f32[n_in] quantised for dot_row_q8 with weights of type fmt: (xq int8, xd, xs f32 per block,
    bias int32 per 4 quants; see ops.quantize_q8_0), padded with zeros to a whole pair of blocks; for
    dot_row_q8k, Q8_K blocks (xs the sums of 16 quants; see ops.quantize_q8_k). Empty arrays for
    types that take floats, and for an input of Q4_K, Q5_K or Q6_K weights that is not on the Q8_K grid."""
    if q8k_dot(fmt):
        n = x.shape[0]
        xq, xd = np.empty(n, np.int8), np.empty(n // 256, np.float32)
        xs, bias = np.empty(n // 16, np.float32), np.empty(n // 4, np.int32)
        if quantize_q8_k(x, 32 if fmt == _Q6_K else 0, xq, xd, xs, bias):
            return xq, xd, xs, bias
        return np.empty(0, np.int8), np.empty(0, np.float32), np.empty(0, np.float32), np.empty(0, np.int32)
    n_pairs = (x.shape[0] // 32 + 1) // 2 if integer_dot(fmt) else 0
    xq = np.empty(64 * n_pairs, np.int8)
    xd, xs = np.empty(2 * n_pairs, np.float32), np.empty(2 * n_pairs, np.float32)
    bias = np.empty(16 * n_pairs, np.int32)
    if n_pairs:
        offset = 8 if fmt == _Q4_0 else 16 if fmt == _Q5_0 else 128 if fmt == _Q8_0 else 0
        quantize_q8_0(x, offset, xq, xd, xs, bias)
    return xq, xd, xs, bias


@njit(inline="always", **HELPER)
def _q8_block_size(fmt):
    """Bytes per block of the types dot_row_q8 takes."""
    if fmt == _Q4_0:
        return 18
    elif fmt == _Q4_1:
        return 20
    elif fmt == _Q5_0:
        return 22
    elif fmt == _Q5_1:
        return 24
    return 34


@njit(inline="always", **HELPER)
def _q8_step(fmt, row, o, p, xv, bz, dx0, dx1, sx0, sx1):
    """One step of dot_row_q8 on row: its blocks at bytes o and p against the input's 64 quants xv,
    bias bz, scales dx0, dx1 and sums sx0, sx1 (Q4_1, Q5_1): (F32x16 of the scaled integer sums, 16
    lanes of 4 products, the m_w * s_x part)."""
    m = np.float32(0.0)
    if fmt == _Q4_0:
        u = load_nibbles(row, o + 2, p + 2)
    elif fmt == _Q4_1:
        u = load_nibbles(row, o + 4, p + 4)
        m = load_f16(row, o + 2) * sx0 + load_f16(row, p + 2) * sx1
    elif fmt == _Q5_0:
        u = with_fifth_bits(load_nibbles(row, o + 6, p + 6), row, o + 2, p + 2)
    elif fmt == _Q5_1:
        u = with_fifth_bits(load_nibbles(row, o + 8, p + 8), row, o + 4, p + 4)
        m = load_f16(row, o + 2) * sx0 + load_f16(row, p + 2) * sx1
    else:
        u = flip_sign(load_bytes(row, o + 2, p + 2))
    return to_f32(dot_u8_i8(bz, u, xv)) * halves(load_f16(row, o) * dx0, load_f16(row, p) * dx1), m


@njit(inline="always", **HELPER)
def dot_row_q8(fmt, row, xin, ahead):
    """dot(row, x) of one Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 weight row with x quantised by q8_input, as
    ggml's vec_dot: per block an exact integer sum of byte products times d_w * d_x (plus m_w * s_x
    for Q4_1 and Q5_1).

    Two blocks per step (_q8_step): their 64 weight bytes (Q4 nibbles unsigned, Q5 nibbles with their
    fifth bit from qh, Q8_0 bytes made unsigned by flipping the sign bit) times the 64 input quants in
    one dot_u8_i8, whose accumulator starts at the input's bias, which subtracts the 8, 16 or 128 the
    unsigned bytes carry. An odd last block is paired with itself against the input's zero padding.
    Each step also prefetches the same bytes of the row ahead (the next one to be read: a row of a
    gather's list defeats the hardware's stream prefetcher), a line at a time as this row streams.
    """
    xq, xd, xs, bias = xin
    size = _q8_block_size(fmt)
    n_blocks = row.shape[0] // size
    acc = zeros()
    m_sum = np.float32(0.0)
    for b in range(0, n_blocks, 2):
        o, p = b * size, min(b + 1, n_blocks - 1) * size
        prefetch(ahead, o)
        v, m = _q8_step(fmt, row, o, p, load_bytes(xq, 32 * b, 32 * b + 32), load_i32(bias, 8 * b), xd[b],
                        xd[b + 1], xs[b], xs[b + 1])
        acc = acc + v
        m_sum += m
    return hsum(acc) + m_sum


@njit(inline="always", **HELPER)
def dot_rows2_q8(fmt, row0, row1, xin, ahead):
    """(dot(row0, x), dot(row1, x)) of two rows of one size, each as dot_row_q8 computes it, the
    input's quants and scales loaded once per step for both (a fifth less work per byte). ahead: the
    first of the next two rows to be read, with the second after it in memory (rows of a matrix):
    their bytes are prefetched in order, as these two rows stream."""
    xq, xd, xs, bias = xin
    size = _q8_block_size(fmt)
    n_blocks = row0.shape[0] // size
    acc0, acc1 = zeros(), zeros()
    m_sum0 = np.float32(0.0)
    m_sum1 = np.float32(0.0)
    for b in range(0, n_blocks, 2):
        o, p = b * size, min(b + 1, n_blocks - 1) * size
        prefetch(ahead, 2 * o)  # past ahead's own end, into the row after it: a hint never faults
        prefetch(ahead, 2 * o + 2 * size)
        xv, bz = load_bytes(xq, 32 * b, 32 * b + 32), load_i32(bias, 8 * b)
        v, m = _q8_step(fmt, row0, o, p, xv, bz, xd[b], xd[b + 1], xs[b], xs[b + 1])
        acc0 = acc0 + v
        m_sum0 += m
        v, m = _q8_step(fmt, row1, o, p, xv, bz, xd[b], xd[b + 1], xs[b], xs[b + 1])
        acc1 = acc1 + v
        m_sum1 += m
    return hsum(acc0) + m_sum0, hsum(acc1) + m_sum1


@njit(inline="always", **HELPER)
def dot_row_q8k(fmt, row, xin, ahead):
    """dot(row, x) of one Q4_K, Q5_K or Q6_K weight row with x in Q8_K blocks (q8_input), as ggml's
    vec_dot: per super-block an exact integer sum of quant products, each sub-block's weighted by its
    scale, times d_w * d_x; minus dmin_w * d_x * the sum of each sub-block's min times its input sum
    (Q4_K, Q5_K).

    A super-block is 4 steps of 64 values: one dot_u8_i8 of the unsigned weight quants with the
    input's, whose lanes (4 products each) are multiplied by their sub-block's scale and summed as
    integers (at most 2**24 a lane). Q6_K's quants carry 32, which the input's bias subtracts.
    """
    xq, xd, xs, bias = xin
    if fmt == _Q6_K:
        size = 210
    elif fmt == _Q5_K:
        size = 176
    else:
        size = 144
    acc = zeros()
    m_sum = np.float32(0.0)
    for b in range(row.shape[0] // size):
        o, xo = b * size, 256 * b
        for i in range(o, o + size, 64):
            prefetch(ahead, i)
        isum = int_zeros()
        if fmt == _Q6_K:
            # step c: values 64c to 64c+63, the low nibbles (c even) or high ones of ql[64(c >> 1):][:64],
            # bits 4(c & 1) (first 32) and 4(c & 1) + 2 (next 32) of qh[32(c >> 1):][:32], scales[4c:4c+4]
            for c in range(4):
                h, n = c >> 1, 4 * (c & 1)
                u = with_high_bits(nibbles(row, o + 64 * h, n), row, o + 128 + 32 * h, n, 2, 3)
                s = dot_u8_i8(load_i32(bias, 64 * b + 16 * c), u, load_bytes(xq, xo + 64 * c, xo + 64 * c + 32))
                isum = isum + s * spread_i8(row, o + 192 + 4 * c)
            acc = acc + to_f32(isum) * (load_f16(row, o + 208) * xd[b])
        else:
            # step c: sub-blocks 2c, 2c+1 (the low and high nibbles of qs[32c:32c+32]; Q5_K's fifth
            # bits 2c and 2c+1 of qh[0:32])
            mins = np.float32(0.0)
            for c in range(4):
                sa, ma = _scale_min_k4(row, o + 4, 2 * c)
                sb, mb = _scale_min_k4(row, o + 4, 2 * c + 1)
                if fmt == _Q5_K:
                    u = with_high_bits(nibble_halves(row, o + 48 + 32 * c), row, o + 16, 2 * c, 1, 1)
                else:
                    u = nibble_halves(row, o + 16 + 32 * c)
                s = dot_u8_i8(int_zeros(), u, load_bytes(xq, xo + 64 * c, xo + 64 * c + 32))
                isum = isum + s * halves(sa, sb)
                g = 16 * b + 4 * c
                mins += np.float32(ma) * (xs[g] + xs[g + 1]) + np.float32(mb) * (xs[g + 2] + xs[g + 3])
            acc = acc + to_f32(isum) * (load_f16(row, o) * xd[b])
            m_sum += load_f16(row, o + 2) * xd[b] * mins
    return hsum(acc) - m_sum


@njit(inline="always", **HELPER)
def row_dot(fmt, row, x, xin, wbuf, xbuf, ahead):
    """dot(row, x) as every mat-vec of the kernels takes it: integer dot products with xin =
    q8_input(fmt, x) for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, and for Q4_K, Q5_K and Q6_K where x is on
    the Q8_K grid, else floats (wbuf, xbuf = tail_buffers(x))."""
    if integer_dot(fmt):
        return dot_row_q8(fmt, row, xin, ahead)
    if q8k_dot(fmt) and xin[0].shape[0]:
        return dot_row_q8k(fmt, row, xin, ahead)
    return dot_row(fmt, row, x, wbuf, xbuf)


@njit(**HELPER)
def _dot_rows(fmt, w, x, xin, out, span):
    """out[r] = dot(W[r], x) for r in span = (lo, hi); w uint8[n_out, row_bytes], x f32[n_in] and
    xin = q8_input(fmt, x), out f32[n_out]. Rows of the integer types go two at a time (dot_rows2_q8,
    prefetching the pair after next), other rows and an odd last one alone."""
    lo, hi = span
    wbuf, xbuf = tail_buffers(x)
    single = lo  # the first row left for row_dot
    if integer_dot(fmt):
        single = lo + (hi - lo) // 2 * 2
        for r in range(lo, single, 2):
            out[r], out[r + 1] = dot_rows2_q8(fmt, w[r], w[r + 1], xin, w[min(r + 4, hi - 1)])
    for r in range(single, hi):
        out[r] = row_dot(fmt, w[r], x, xin, wbuf, xbuf, w[min(r + 1, hi - 1)])


@njit(**HELPER)
def _dequant_rows(fmt, w, ids, out, lo, hi):
    """out[k] = W[ids[k]] as f32 for k in [lo, hi); w uint8[n_out, row_bytes], ids int64[T],
    out f32[T, n_in]."""
    n_in = out.shape[1]
    n_groups = n_in // LANES
    n_tail = n_in - n_groups * LANES
    tail_bytes = n_tail * (w.shape[1] // n_in)
    wbuf = np.zeros(4 * LANES, np.uint8)
    vbuf = np.zeros(LANES, np.float32)
    for k in range(lo, hi):
        row = w[ids[k]]
        dst = out[k]
        for g in range(n_groups):
            store_f32(dst, g * LANES, decode(fmt, row, g))
        if n_tail:
            copy(row, row.shape[0] - tail_bytes, wbuf, 0, tail_bytes)
            store_f32(vbuf, 0, decode(fmt, wbuf, 0))
            copy(vbuf, 0, dst, n_groups * LANES, n_tail)


@njit(**HELPER)
def _store_dot(out, t, r, v, a_row, x_row, n_head):
    """out[t, r] = v + the tail products a_row[k] * x_row[k] for k >= n_head (n_in % 16 of them)."""
    for k in range(n_head, x_row.shape[0]):
        v += a_row[k] * x_row[k]
    out[t, r] = v


@njit(**HELPER)
def _gemm_tile(a, n_rows, x, out, r0):
    """out[t, r0 + i] = dot(a[i], x[t]) for i < n_rows and every t.

    a: f32[>= n_rows, n_in] dequantised rows (the tile, in L2); x: f32[T, n_in]; out: f32[T, n_out].
    Register blocking: 4 rows x 4 tokens = 16 accumulators of 16 lanes, 8 loads per 16 multiply-adds.
    Blocks past the last row or token repeat it (clamped) and store nothing for it; every output is
    the same sequence of multiply-adds whichever slot computes it, so results do not depend on the
    chunking.
    """
    T, n_in = x.shape
    n_head = n_in // LANES * LANES
    last = n_rows - 1
    for t in range(0, T, 4):
        x0, x1, x2, x3 = x[t], x[min(t + 1, T - 1)], x[min(t + 2, T - 1)], x[min(t + 3, T - 1)]
        for i in range(0, n_rows, 4):
            a0, a1, a2, a3 = a[i], a[min(i + 1, last)], a[min(i + 2, last)], a[min(i + 3, last)]
            c00, c01, c02, c03 = zeros(), zeros(), zeros(), zeros()
            c10, c11, c12, c13 = zeros(), zeros(), zeros(), zeros()
            c20, c21, c22, c23 = zeros(), zeros(), zeros(), zeros()
            c30, c31, c32, c33 = zeros(), zeros(), zeros(), zeros()
            for o in range(0, n_head, LANES):
                w0, w1, w2, w3 = load_f32(a0, o), load_f32(a1, o), load_f32(a2, o), load_f32(a3, o)
                v = load_f32(x0, o)
                c00, c10, c20, c30 = c00 + w0 * v, c10 + w1 * v, c20 + w2 * v, c30 + w3 * v
                v = load_f32(x1, o)
                c01, c11, c21, c31 = c01 + w0 * v, c11 + w1 * v, c21 + w2 * v, c31 + w3 * v
                v = load_f32(x2, o)
                c02, c12, c22, c32 = c02 + w0 * v, c12 + w1 * v, c22 + w2 * v, c32 + w3 * v
                v = load_f32(x3, o)
                c03, c13, c23, c33 = c03 + w0 * v, c13 + w1 * v, c23 + w2 * v, c33 + w3 * v
            n_t, n_i = min(4, T - t), min(4, n_rows - i)
            for j, (cj0, cj1, cj2, cj3, xj) in enumerate(((c00, c10, c20, c30, x0), (c01, c11, c21, c31, x1),
                                                          (c02, c12, c22, c32, x2), (c03, c13, c23, c33, x3))):
                if j < n_t:
                    _store_dot(out, t + j, r0 + i, hsum(cj0), a0, xj, n_head)
                    if n_i > 1:
                        _store_dot(out, t + j, r0 + i + 1, hsum(cj1), a1, xj, n_head)
                    if n_i > 2:
                        _store_dot(out, t + j, r0 + i + 2, hsum(cj2), a2, xj, n_head)
                    if n_i > 3:
                        _store_dot(out, t + j, r0 + i + 3, hsum(cj3), a3, xj, n_head)


# ---- one thread's share of each entry kernel ---------------------------------------------------
# The prange bodies call plain (not inlined) functions: inlined into numba's parallel loop body, the
# same row loops ran at half the speed (Q4_0 mat-vec, one thread: 7 GB/s there, 17 GB/s here).

@njit(**HELPER)
def _matmul_chunk(fmt, w, x, out, span):
    """out[:, lo:hi] for span = (lo, hi), a tile of rows at a time (about 256 KiB of f32, in L2)."""
    lo, hi = span
    n_in = x.shape[1]
    tile = min(64, max(4, (1 << 16) // n_in // 4 * 4))
    scratch = np.empty((tile, n_in), np.float32)
    ids = np.arange(tile)
    for a in range(lo, hi, tile):
        b = min(a + tile, hi)
        _dequant_rows(fmt, w[a:b], ids, scratch, 0, b - a)
        _gemm_tile(scratch, b - a, x, out, a)


# ---- kernels, generic in the format (a compile-time constant) ----------------------------------

@njit(**SHARED_PARALLEL)
def matvec(fmt, w, x, out, n_chunks):
    """out = W @ x (x quantised first for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights, and for Q4_K, Q5_K
    and Q6_K where it is on the Q8_K grid, which loses nothing).

    fmt: GGML type code, a compile-time constant; w: uint8[n_out, row_bytes] C-contiguous, each
    row n_in values in fmt's blocks; x: float32[n_in] C-contiguous; out: float32[n_out], written;
    n_chunks: row chunks, one per thread. Each row is computed by one thread, in the same order
    whatever n_chunks is.
    """
    n = w.shape[0]
    xin = q8_input(fmt, x)
    for c in prange(n_chunks):
        _dot_rows(fmt, w, x, xin, out, (c * n // n_chunks, (c + 1) * n // n_chunks))


@njit(**PARALLEL)
def get_rows(fmt, w, ids, out, n_chunks):
    """out[k] = W[ids[k]] dequantised.

    fmt: GGML type code, a compile-time constant; w: uint8[n_out, row_bytes] C-contiguous; ids:
    int64[T], each in [0, n_out); out: float32[T, n_in] C-contiguous, written; n_chunks: chunks of
    ids, one per thread.
    """
    n = ids.shape[0]
    for c in prange(n_chunks):
        _dequant_rows(fmt, w, ids, out, c * n // n_chunks, (c + 1) * n // n_chunks)


@njit(**PARALLEL)
def matmul(fmt, w, x, out, n_chunks):
    """out = x @ W.T (x rounded first to Q8_0 blocks for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights, as
    matvec's quantised input means).

    fmt: GGML type code, a compile-time constant; w: uint8[n_out, row_bytes] C-contiguous; x:
    float32[T, n_in] C-contiguous; out: float32[T, n_out] C-contiguous, written; n_chunks: row
    chunks, one per thread. Each thread dequantises its rows a tile at a time (about 256 KiB of
    f32, kept in L2) and multiplies the tile with every token; each output is computed by one
    thread, in the same order whatever n_chunks is.
    """
    n = w.shape[0]
    if integer_dot(fmt):
        rounded = np.empty_like(x)
        round_for_dot(ROUND_Q8_0, x, rounded)
        x = rounded
    for c in prange(n_chunks):
        _matmul_chunk(fmt, w, x, out, (c * n // n_chunks, (c + 1) * n // n_chunks))


# ---- entry kernels: one cached dispatcher per format --------------------------------------------
# Each closes over its format (numba types the closure variable as a Literal[int] and keys its
# disk cache on it), so a first run compiles only the formats its model holds. A run-time format
# argument would compile every format's loops into every kernel: 13 times the work.

@functools.cache
def matvec_for(fmt: int):
    """matvec(fmt, ...) as a cached kernel of (w, x, out, n_chunks)."""
    @njit(**SERIAL_KERNEL)
    def matvec_fmt(w, x, out, n_chunks):
        matvec(fmt, w, x, out, n_chunks)
    return matvec_fmt


@functools.cache
def get_rows_for(fmt: int):
    """get_rows(fmt, ...) as a cached kernel of (w, ids, out, n_chunks)."""
    @njit(**KERNEL)
    def get_rows_fmt(w, ids, out, n_chunks):
        get_rows(fmt, w, ids, out, n_chunks)
    return get_rows_fmt


@functools.cache
def matmul_for(fmt: int):
    """matmul(fmt, ...) as a cached kernel of (w, x, out, n_chunks)."""
    @njit(**KERNEL)
    def matmul_fmt(w, x, out, n_chunks):
        matmul(fmt, w, x, out, n_chunks)
    return matmul_fmt

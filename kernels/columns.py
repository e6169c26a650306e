"""An input-sparse ("TEAL") mat-vec over a column-major copy of a weight matrix that holds the file's
own numbers: y = sum over the kept inputs j (|x_j| >= threshold) of x_j * W[:, j], reading only the
kept columns.

The layout (layout, build_columns), for W [n_out, n_in] with its rows padded with zeros to n_pad, a
multiple of 32 (threads take whole groups of 32 rows; padding rows are never written out):

- quants uint8[n_in * stride]: column j's n_pad values at bytes [j * stride, ...), the stride an odd
  number of 64-byte lines (a power-of-two stride maps the columns a step reads to one cache set:
  1.3-1.8x slower). Q8_0: the file's int8 quants, row r at byte r. Q4_0 / Q4_1: the file's 4-bit
  quants, rows 32g + k (low nibble) and 32g + 16 + k (high nibble) in byte 16g + k, the order a block
  keeps its values in, so that 16 bytes make two 16-row vectors with an and and a shift. F16, BF16,
  F32: the values themselves (a transpose).
- scales uint8[n_blocks * 2 * n_pad]: the f16 scale d of row r's input block b (inputs 32b..32b+31)
  at bytes 2 * (b * n_pad + r), a block's scales contiguous; mins the same for Q4_1's m. Empty for the
  float types (mins for Q4_0 and Q8_0 too).

Every number is the file's, so nothing is rounded a second time; the copy takes the file's bytes, plus
the padding rows and less than two lines a column.

The mat-vec (input_sparse_matvec) takes x as the dense mat-vec does (cpu.matvec): for Q4_0, Q4_1 and
Q8_0, the masked x (dropped inputs zeroed) quantised to Q8_0 blocks by the same function (so a block's
scale is that of its kept inputs), and per row and block an exact integer sum over the kept columns of
x's quants times the weight's, times d_w * d_x (plus m_w * s_x for Q4_1): the terms of matvec of the
masked x, summed in another order. Float types: the sum over kept j of x_j * W[:, j] in float32. Kept
columns go four at a time: their 16-row pieces interleaved into one 64-byte vector (gather4), one
dot_u8_i8 (vpdpbusd) against x's four quants.

Threads take the blocks in two fixed parts (the rows in chunks too, beyond two threads), each walking
the kept columns of its part over its rows, block by block; the two parts' sums are added last, so
every output is the same sums in the same order whatever the thread count. Callers
(kernels/__init__.py) check shapes and dtypes; nothing here checks bounds.
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .config import HELPER, KERNEL, PARALLEL
from .cpu import _BF16, _F16, _F32, _Q4_0, _Q4_1, _Q8_0
from .ops import quantize_q8_0
from .simd import (_I8, _I32, _VB, _VI, _element_ptr, _is_array, _load, _splat, bits_to_f32, dot_u8_i8,
                   flip_sign, half_to_f32, int_zeros, load_f32, load_u16, load_u32, prefetch, store_f32, to_f32,
                   u8x64, zeros)

GROUP = 32  # rows per group: one Q4 byte holds two of its rows; threads get whole groups
TILE = 4 * GROUP  # rows summed in registers per block and step: eight vectors of 16
# bytes of each kept column read per pass over the blocks: long runs stream best (Q4_0 at 1024 rows,
# 512 bytes: 1.15x slower; 256 rows: 2x), and a pass with the next one prefetched stays in L2
PANEL_BYTES = 8192


# ---- vectors for the interleaved columns (the U8x64 of simd.py) ---------------------------------

@intrinsic
def gather4(typingctx, a, i0, i1, i2, i3):
    """U8x64 of the 16 bytes at each of a[i0:], a[i1:], a[i2:], a[i3:] interleaved: byte 4l + k is
    a[ik + l] (a: uint8 1-D), so that lane l of a dot_u8_i8 sums the four columns of row l."""
    if not (_is_array(a, types.uint8) and all(isinstance(i, types.Integer) for i in (i0, i1, i2, i3))):
        return None

    def codegen(context, builder, sig, args):
        parts = [_load(builder, _element_ptr(context, builder, sig.args[0], args[0], i, t), _I8, 16)
                 for i, t in zip(args[1:], sig.args[1:])]
        first = builder.shuffle_vector(parts[0], parts[1], _mask(range(32)))
        second = builder.shuffle_vector(parts[2], parts[3], _mask(range(32)))
        return builder.shuffle_vector(first, second, _mask([16 * k + l for l in range(16) for k in range(4)]))
    return u8x64(a, i0, i1, i2, i3), codegen


@intrinsic
def nibble(typingctx, v, shift):
    """U8x64 of (v >> shift) & 15 per byte (shift 0 or 4, a constant)."""
    if not (v == u8x64 and isinstance(shift, types.IntegerLiteral)):
        return None
    s = shift.literal_value

    def codegen(context, builder, sig, args):
        shifted = builder.lshr(args[0], ir.Constant(_VB, [s] * 64)) if s else args[0]
        return builder.and_(shifted, ir.Constant(_VB, [15] * 64))
    return u8x64(v, shift), codegen


@intrinsic
def splat4(typingctx, p):
    """U8x64 of the four bytes of the int32 p (little-endian) repeated 16 times: four x quants for gather4's lanes."""
    if not isinstance(p, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        word = context.cast(builder, args[0], sig.args[0], types.int32)
        return builder.bitcast(_splat(builder, word, _VI), _VB)
    return u8x64(p), codegen


def _mask(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


@njit(inline="always", **HELPER)
def _integer(fmt):
    return fmt == _Q4_0 or fmt == _Q4_1 or fmt == _Q8_0


# ---- the layout --------------------------------------------------------------------------------

def layout(fmt: int, n_out: int, n_in: int) -> tuple:
    """(n_pad, stride, n_scales, n_mins) of W [n_out, n_in] of type fmt (module docstring): rows padded
    to n_pad, column j's values at bytes [j * stride, j * stride + n_pad * bits / 8) of quants
    (uint8[n_in * stride]), the sizes of scales and mins in bytes."""
    n_pad = -(-n_out // GROUP) * GROUP
    lines = -(-n_pad * _COLUMN_BITS[fmt] // 8 // 64)
    n_scales = 2 * n_pad * (n_in // 32) if _COLUMN_BITS[fmt] <= 8 else 0
    return n_pad, 64 * (lines | 1), n_scales, n_scales if fmt == _Q4_1 else 0


_COLUMN_BITS = {_Q4_0: 4, _Q4_1: 4, _Q8_0: 8, _F16: 16, _BF16: 16, _F32: 32}


def allocate(fmt: int, n_out: int, n_in: int) -> tuple:
    """Zeroed (quants, scales, mins) for layout(fmt, n_out, n_in), quants starting on a 64-byte line."""
    n_pad, stride, n_scales, n_mins = layout(fmt, n_out, n_in)
    buffer = np.zeros(n_in * stride + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + n_in * stride], np.zeros(n_scales, np.uint8), np.zeros(n_mins, np.uint8)


@njit(inline="always", **HELPER)
def _file_bytes(fmt):
    """Bytes of 32 consecutive values of one row in the file's blocks."""
    if fmt == _Q8_0:
        return 34
    elif fmt == _Q4_0:
        return 18
    elif fmt == _Q4_1:
        return 20
    elif fmt == _F32:
        return 128
    return 64


@njit(inline="always", **HELPER)
def _group_bytes(fmt):
    """Bytes of one column's group of 32 rows in the layout."""
    if fmt == _Q4_0 or fmt == _Q4_1:
        return 16
    elif fmt == _Q8_0:
        return 32
    elif fmt == _F32:
        return 128
    return 64


@njit(**HELPER)
def _transpose_group(fmt, rows, g, quants, scales, mins, stride, n_pad):
    """Rows 32g..32g+31 of the matrix, rows uint8[32, row_bytes] (the file's blocks), into the layout."""
    r0 = GROUP * g
    c0 = g * _group_bytes(fmt)  # the group's first byte in each column
    if _integer(fmt):
        size = _file_bytes(fmt)
        head = 4 if fmt == _Q4_1 else 2  # scale (and min) bytes before the quants
        for b in range(rows.shape[1] // size):
            o, s = b * size, 2 * (b * n_pad + r0)
            for k in range(GROUP):
                scales[s + 2 * k] = rows[k, o]
                scales[s + 2 * k + 1] = rows[k, o + 1]
            if fmt == _Q4_1:
                for k in range(GROUP):
                    mins[s + 2 * k] = rows[k, o + 2]
                    mins[s + 2 * k + 1] = rows[k, o + 3]
            for i in range(32):
                c = (32 * b + i) * stride + c0
                if fmt == _Q8_0:
                    for k in range(GROUP):
                        quants[c + k] = rows[k, o + head + i]
                else:
                    # value i of a block: the low nibble of byte i (i < 16), else the high one of byte i - 16
                    byte, shift = o + head + (i & 15), 4 * (i >> 4)
                    for k in range(16):
                        quants[c + k] = ((rows[k, byte] >> shift) & 15) | (((rows[k + 16, byte] >> shift) & 15) << 4)
    elif fmt == _F32:
        _transpose_values(rows.view(np.uint32), g, quants.view(np.uint32), stride // 4)
    else:
        _transpose_values(rows.view(np.uint16), g, quants.view(np.uint16), stride // 2)


@njit(**HELPER)
def _transpose_values(rows, g, columns, stride):
    """columns[j * stride + 32g + k] = rows[k, j]: a group of 32 rows of float values (as integers of
    their size)."""
    for j in range(rows.shape[1]):
        c = j * stride + GROUP * g
        for k in range(GROUP):
            columns[c + k] = rows[k, j]


@njit(**PARALLEL)
def build_columns(fmt, w, quants, scales, mins, n_chunks):
    """The column layout (module docstring) of w uint8[n_out, row_bytes], the file's blocks of type fmt
    (a compile-time constant: Q4_0, Q4_1, Q8_0, F16, BF16 or F32), written into quants, scales and mins
    (uint8 1-D, sized by layout()); n_chunks: chunks of row groups, one per thread."""
    n_out, row_bytes = w.shape
    n_in = row_bytes * 32 // _file_bytes(fmt)
    stride = quants.shape[0] // n_in
    n_groups = -(-n_out // GROUP)
    n_pad = GROUP * n_groups
    for c in prange(n_chunks):
        for g in range(c * n_groups // n_chunks, (c + 1) * n_groups // n_chunks):
            if GROUP * (g + 1) <= n_out:
                _transpose_group(fmt, w[GROUP * g:GROUP * (g + 1)], g, quants, scales, mins, stride, n_pad)
            else:  # the last group, short: its missing rows are zeros (scale 0, quants 0)
                rows = np.zeros((GROUP, row_bytes), np.uint8)
                rows[:n_out - GROUP * g] = w[GROUP * g:]
                _transpose_group(fmt, rows, g, quants, scales, mins, stride, n_pad)


# ---- the mat-vec -------------------------------------------------------------------------------

@njit(**HELPER)
def _plan(fmt, x, threshold, stride):
    """The kept columns of x f32[n_in] (|x_j| >= threshold, and for Q4_0, Q4_1 and Q8_0 a non-zero quant
    once the masked x is quantised), four at a time per block of 32 inputs: (offsets int64[n_in], the
    columns' byte offsets in quants, a block's last four padded by repeating its last column; starts
    int64[n_blocks + 1], block b's fours being [starts[b], starts[b + 1]); packed int32[n_in // 4], a
    four's int8 quants of x, one a byte (Q4_0, Q4_1, Q8_0; padding 0); coeffs f32[n_in], the x_j of the
    float formats (padding 0); xd, xs f32[n_blocks], the masked x's Q8_0 scale and d * sum of quants;
    bias int32[n_blocks], -offset * sum of quants, which takes away the 8 (Q4_0) or 128 (Q8_0, its bytes
    taken unsigned) the weight quants carry; kept int64[n_blocks], the columns listed, without padding)."""
    n_in = x.shape[0]
    n_blocks = n_in // 32
    offsets = np.empty(n_in, np.int64)
    starts = np.empty(n_blocks + 1, np.int64)
    packed = np.zeros(n_in // 4, np.int32)
    coeffs = np.zeros(n_in, np.float32)
    xd, xs = np.zeros(n_blocks, np.float32), np.zeros(n_blocks, np.float32)
    bias = np.zeros(n_blocks, np.int32)
    kept = np.zeros(n_blocks, np.int64)
    masked = np.empty(n_in, np.float32)
    for j in range(n_in):
        masked[j] = x[j] if abs(x[j]) >= threshold else np.float32(0.0)
    xq = np.zeros(n_in, np.int8)
    if _integer(fmt):
        quantize_q8_0(masked, 0, xq, xd, xs, np.empty(n_in // 4, np.int32))
    offset = 8 if fmt == _Q4_0 else 128 if fmt == _Q8_0 else 0
    n = 0  # columns listed
    for b in range(n_blocks):
        starts[b] = n // 4
        total = 0
        for j in range(32 * b, 32 * b + 32):
            if (xq[j] != 0) if _integer(fmt) else (masked[j] != 0.0):
                offsets[n] = j * stride
                coeffs[n] = masked[j]
                packed[n // 4] |= (np.int32(xq[j]) & 255) << (8 * (n & 3))
                total += np.int32(xq[j])
                n += 1
        kept[b] = n - 4 * starts[b]
        while n & 3:
            offsets[n] = offsets[n - 1]
            n += 1
        bias[b] = -offset * total
    starts[n_blocks] = n // 4
    return offsets, starts, packed, coeffs, xd, xs, bias, kept


@njit(inline="always", **HELPER)
def _quant_vectors(fmt, quants, c0, c1, c2, c3, o):
    """Rows 0-15 and 16-31 of a group of four columns (their group's first bytes at c0 + o .. c3 + o) as
    two U8x64 of unsigned quants, byte 4l + k holding column k's quant of row l (Q8_0's offset by 128)."""
    if fmt == _Q8_0:
        # 16 bytes at a time: one 32-byte load a column and two-source permutes ran 10% faster in cache
        # but 20% slower from memory
        return (flip_sign(gather4(quants, c0 + o, c1 + o, c2 + o, c3 + o)),
                flip_sign(gather4(quants, c0 + o + 16, c1 + o + 16, c2 + o + 16, c3 + o + 16)))
    v = gather4(quants, c0 + o, c1 + o, c2 + o, c3 + o)
    return nibble(v, 0), nibble(v, 4)


@njit(inline="always", **HELPER)
def _values(fmt, quants, c):
    """F32x16 of the 16 float weights at byte c of the layout."""
    if fmt == _F16:
        return half_to_f32(load_u16(quants, c))
    elif fmt == _BF16:
        return bits_to_f32(load_u16(quants, c) << 16)
    return bits_to_f32(load_u32(quants, c))


@njit(inline="always", **HELPER)
def _prefetch_column(quants, offsets, ahead, q, n_bytes):
    """Prefetch n_bytes of column q of ahead = (q0, q1, o), the next columns to read: offsets[q0:q1]
    at byte o; returns q + 1 (nothing past q1)."""
    q0, q1, o = ahead
    if q < q1:
        for line in range(0, n_bytes, 64):
            prefetch(quants, offsets[q] + o + line)
    return q + 1


@njit(inline="always", **HELPER)
def _scale_add(fmt, acc, scales, mins, s, r, lo, hi, xd, xs):
    """acc[r:r+32] += the integer sums lo (rows r..r+15) and hi (the next 16) times d_w * d_x, plus
    m_w * s_x for Q4_1; the block's scales start at byte s."""
    d0 = half_to_f32(load_u16(scales, s + 2 * r)) * xd
    d1 = half_to_f32(load_u16(scales, s + 2 * r + 32)) * xd
    v0 = load_f32(acc, r) + to_f32(lo) * d0
    v1 = load_f32(acc, r + 16) + to_f32(hi) * d1
    if fmt == _Q4_1:
        v0 = v0 + half_to_f32(load_u16(mins, s + 2 * r)) * xs
        v1 = v1 + half_to_f32(load_u16(mins, s + 2 * r + 32)) * xs
    store_f32(acc, r, v0)
    store_f32(acc, r + 16, v1)


@njit(inline="always", **HELPER)
def _integer_tile(fmt, quants, scales, mins, plan, acc, b, rows, ahead):
    """acc[r:r+32] += block b's kept columns over the groups of rows r in rows = (r0, r1, r2, r3)
    (ascending; a repeated one is stored once): eight accumulators of 16 rows, the columns four at a
    time, then the block's scales. Each four prefetches four columns of ahead (_prefetch_column)."""
    offsets, starts, packed, coeffs, xd, xs, bias, kept = plan
    r0, r1, r2, r3 = rows
    gb = _group_bytes(fmt)
    o0, o1, o2, o3 = r0 // GROUP * gb, r1 // GROUP * gb, r2 // GROUP * gb, r3 // GROUP * gb
    a0 = int_zeros() + bias[b]
    a1, b0, b1, c0, c1, d0, d1 = a0, a0, a0, a0, a0, a0, a0
    q = ahead[0]
    for k in range(starts[b], starts[b + 1]):
        for _ in range(4):
            q = _prefetch_column(quants, offsets, ahead, q, 4 * gb)
        j0, j1, j2, j3 = offsets[4 * k], offsets[4 * k + 1], offsets[4 * k + 2], offsets[4 * k + 3]
        xv = splat4(packed[k])
        u, v = _quant_vectors(fmt, quants, j0, j1, j2, j3, o0)
        a0, a1 = dot_u8_i8(a0, u, xv), dot_u8_i8(a1, v, xv)
        u, v = _quant_vectors(fmt, quants, j0, j1, j2, j3, o1)
        b0, b1 = dot_u8_i8(b0, u, xv), dot_u8_i8(b1, v, xv)
        u, v = _quant_vectors(fmt, quants, j0, j1, j2, j3, o2)
        c0, c1 = dot_u8_i8(c0, u, xv), dot_u8_i8(c1, v, xv)
        u, v = _quant_vectors(fmt, quants, j0, j1, j2, j3, o3)
        d0, d1 = dot_u8_i8(d0, u, xv), dot_u8_i8(d1, v, xv)
    while q < ahead[1]:
        q = _prefetch_column(quants, offsets, ahead, q, 4 * gb)
    s = 2 * b * acc.shape[0]
    _scale_add(fmt, acc, scales, mins, s, r0, a0, a1, xd[b], xs[b])
    if r1 > r0:
        _scale_add(fmt, acc, scales, mins, s, r1, b0, b1, xd[b], xs[b])
    if r2 > r1:
        _scale_add(fmt, acc, scales, mins, s, r2, c0, c1, xd[b], xs[b])
    if r3 > r2:
        _scale_add(fmt, acc, scales, mins, s, r3, d0, d1, xd[b], xs[b])


@njit(inline="always", **HELPER)
def _float_add(acc, r, lo, hi):
    """acc[r:r+32] += lo (rows r..r+15) and hi (the next 16)."""
    store_f32(acc, r, load_f32(acc, r) + lo)
    store_f32(acc, r + 16, load_f32(acc, r + 16) + hi)


@njit(inline="always", **HELPER)
def _float_tile(fmt, quants, plan, acc, b, rows, ahead):
    """_integer_tile for the float formats: acc += block b's kept columns times their x_j, one column
    (and one prefetched) at a time."""
    offsets, starts, packed, coeffs, xd, xs, bias, kept = plan
    r0, r1, r2, r3 = rows
    gb = _group_bytes(fmt)
    h = gb // 2  # bytes of 16 rows
    o0, o1, o2, o3 = r0 // GROUP * gb, r1 // GROUP * gb, r2 // GROUP * gb, r3 // GROUP * gb
    a0, a1, b0, b1, c0, c1, d0, d1 = zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros()
    q = ahead[0]
    for k in range(4 * starts[b], 4 * starts[b] + kept[b]):
        q = _prefetch_column(quants, offsets, ahead, q, 4 * gb)
        j, v = offsets[k], coeffs[k]
        a0, a1 = a0 + _values(fmt, quants, j + o0) * v, a1 + _values(fmt, quants, j + o0 + h) * v
        b0, b1 = b0 + _values(fmt, quants, j + o1) * v, b1 + _values(fmt, quants, j + o1 + h) * v
        c0, c1 = c0 + _values(fmt, quants, j + o2) * v, c1 + _values(fmt, quants, j + o2 + h) * v
        d0, d1 = d0 + _values(fmt, quants, j + o3) * v, d1 + _values(fmt, quants, j + o3 + h) * v
    while q < ahead[1]:
        q = _prefetch_column(quants, offsets, ahead, q, 4 * gb)
    _float_add(acc, r0, a0, a1)
    if r1 > r0:
        _float_add(acc, r1, b0, b1)
    if r2 > r1:
        _float_add(acc, r2, c0, c1)
    if r3 > r2:
        _float_add(acc, r3, d0, d1)


@njit(**HELPER)
def _column_rows(fmt, quants, scales, mins, plan, acc, span, blocks):
    """acc[r] = the sum over the blocks b in range(*blocks) for the rows r in span = (lo, hi) (whole
    groups of 32); acc f32[n_pad].

    Panels of PANEL_BYTES of each column, blocks inside, each block over the panel a tile of four
    groups at a time (the last tile's missing groups repeat its last one). Each tile prefetches the
    same rows of the next block's kept columns and scales (the first block's in the next panel, after
    the last block), a column per column it sums: a block's pieces are short streams, which the
    hardware prefetcher picks up too late (without this 1.6-2.9x slower; without the scales, Q4_0
    1.3x; all at the tile's start, Q8_0 1.3x; in each column's order rather than the rows', 1.2x)."""
    offsets, starts, packed, coeffs, xd, xs, bias, kept = plan
    lo, hi = span
    b_lo, b_hi = blocks
    n_pad = acc.shape[0]
    gb = _group_bytes(fmt)
    panel = PANEL_BYTES // gb * GROUP  # rows
    first = b_lo
    while first < b_hi and kept[first] == 0:
        first += 1
    for r in range(lo, hi, 16):
        store_f32(acc, r, zeros())
    if first == b_hi:
        return
    # the prefetch cursor, a block ahead (two or three: no faster): block pf of the panel starting at row pp
    pf, pp = _next_block(kept, first, lo, first, b_hi, panel)
    for p in range(lo, hi, panel):
        pe = min(p + panel, hi)
        b = first
        while b < b_hi:
            nb = b + 1
            while nb < b_hi and kept[nb] == 0:
                nb += 1
            for t in range(p, pe, TILE):
                last = pe - GROUP
                rows = (t, min(t + GROUP, last), min(t + 2 * GROUP, last), min(t + 3 * GROUP, last))
                ahead = (4 * starts[pf], 4 * starts[pf] + kept[pf], (pp + t - p) // GROUP * gb)
                if _integer(fmt):
                    s = 2 * (pf * n_pad + pp + t - p)
                    for line in range(0, 2 * TILE, 64):
                        prefetch(scales, s + line)
                        if fmt == _Q4_1:
                            prefetch(mins, s + line)
                    _integer_tile(fmt, quants, scales, mins, plan, acc, b, rows, ahead)
                else:
                    _float_tile(fmt, quants, plan, acc, b, rows, ahead)
            pf, pp = _next_block(kept, pf, pp, first, b_hi, panel)
            b = nb


@njit(inline="always", **HELPER)
def _next_block(kept, b, p, first, b_hi, panel):
    """The block with kept columns after block b of the panel starting at row p, as (block, panel
    start): the first one of the next panel after the last."""
    b += 1
    while b < b_hi and kept[b] == 0:
        b += 1
    return (b, p) if b < b_hi else (first, p + panel)


@njit(**HELPER)
def _halfway(fmt, kept):
    """The block that splits the blocks into two parts of about equal bytes to read per row (each
    kept column's, and each block's scales where it has kept columns)."""
    scale_bytes = 4 if fmt == _Q4_1 else 2 if _integer(fmt) else 0
    total = 0
    for b in range(kept.shape[0]):
        total += kept[b] * _group_bytes(fmt) + (GROUP * scale_bytes if kept[b] else 0)
    part = 0
    for b in range(kept.shape[0]):
        if 2 * part >= total:
            return b
        part += kept[b] * _group_bytes(fmt) + (GROUP * scale_bytes if kept[b] else 0)
    return kept.shape[0]


@njit(**PARALLEL)
def input_sparse_matvec(fmt, quants, scales, mins, x, threshold, out, n_chunks):
    """out = W @ (x masked to |x_j| >= threshold), reading only the kept columns of W's column layout.

    fmt: the layout's GGML type code (Q4_0, Q4_1, Q8_0, F16, BF16 or F32), a compile-time constant;
    quants, scales, mins: build_columns' arrays for W [n_out, n_in]; x: float32[n_in] (n_in a multiple
    of 32); threshold: float32 >= 0; out: float32[n_out], written; n_chunks: threads.

    The blocks are split in two parts of about equal bytes (_halfway, which depends on x alone), whose
    sums are added last, out = part 0 + part 1, and the rows in max(1, n_chunks // 2) chunks; each
    (chunk, part) is one thread's, so that two threads read whole columns, each of its own blocks.
    (Two threads on the two halves of each column's rows instead: Q4_0 4096 x 4096 with half the inputs
    kept took 1.0x the dense mat-vec's time rather than 0.8x, Q8_0 0.72x rather than 0.6x; apparently
    each core's prefetchers fetch lines of the other's half.) Every output is the same sums in the same
    order whatever n_chunks is. Exact as the module docstring says: for Q4_0, Q4_1 and Q8_0 the terms
    of cpu.matvec of the masked x, summed in another order.
    """
    n_out = out.shape[0]
    n_groups = -(-n_out // GROUP)
    plan = _plan(fmt, x, threshold, quants.shape[0] // x.shape[0])
    n_blocks = plan[1].shape[0] - 1
    split = _halfway(fmt, plan[7])
    n_rows = max(1, n_chunks // 2)
    acc = np.empty((2, GROUP * n_groups), np.float32)
    for item in prange(2 * n_rows):
        c, part = item // 2, item % 2
        lo, hi = c * n_groups // n_rows, (c + 1) * n_groups // n_rows
        blocks = (0, split) if part == 0 else (split, n_blocks)
        if hi > lo:
            _column_rows(fmt, quants, scales, mins, plan, acc[part], (GROUP * lo, GROUP * hi), blocks)
    for r in range(n_out):
        out[r] = acc[0, r] + acc[1, r]


# ---- entry kernels: one cached dispatcher per format, as in cpu.py ------------------------------

@functools.cache
def build_columns_for(fmt: int):
    """build_columns(fmt, ...) as a cached kernel of (w, quants, scales, mins, n_chunks)."""
    @njit(**KERNEL)
    def build_columns_fmt(w, quants, scales, mins, n_chunks):
        build_columns(fmt, w, quants, scales, mins, n_chunks)
    return build_columns_fmt


@functools.cache
def input_sparse_matvec_for(fmt: int):
    """input_sparse_matvec(fmt, ...) as a cached kernel of (quants, scales, mins, x, threshold, out, n_chunks)."""
    @njit(**KERNEL)
    def input_sparse_matvec_fmt(quants, scales, mins, x, threshold, out, n_chunks):
        input_sparse_matvec(fmt, quants, scales, mins, x, threshold, out, n_chunks)
    return input_sparse_matvec_fmt

"""Numba kernels that touch only the active FFN neurons, over GGUF blocks read in place.

gather_matvec: the dot products of a list of rows of gate or up with x. sparse_axpy: the sum of
the active neurons' down columns, each stored as one contiguous row of a neuron-major matrix,
scaled by their activations. Both are generic in the format, a compile-time constant, as the
dense kernels are. mlp_select (a predictor's decode step) and sparse_ffn (the FFN over the neurons
it picked) chain them in one call each, with their glue. Python calls the dispatchers the ``*_for``
functions make for the formats at hand (see cpu.py). Callers (kernels/__init__.py) check shapes
and index ranges.
"""

import functools

import numpy as np
from numba import njit, prange

from hybridinfer.kernels.config import HELPER, KERNEL, PARALLEL, SERIAL_KERNEL, SHARED_PARALLEL
from hybridinfer.kernels.cpu import _Q4_0, _Q4_1, _Q8_0, decode, matvec, q8_input, row_dot, tail_buffers
from hybridinfer.kernels.ops import gated
from hybridinfer.kernels.simd import LANES, load_f16, load_f32, load_i8, load_u8, prefetch, store_f32, to_f32, zeros


JUMP = 2.0  # a scattered row's extra cost in _balanced_bounds, in rows read in sequence


@njit(**HELPER)
def _gather_dots(fmt, w, rows, x, xin, out, span):
    """out[k] = dot(W[rows[k]], x) for k in span = (lo, hi); xin = q8_input(fmt, x). The row four
    ahead in the list streams into the cache alongside (two neurons ahead in sparse_ffn's gate/up pairs)."""
    lo, hi = span
    wbuf, xbuf = tail_buffers(x)
    for k in range(lo, hi):
        out[k] = row_dot(fmt, w[rows[k]], x, xin, wbuf, xbuf, w[rows[min(k + 4, hi - 1)]])


@njit(inline="always", **HELPER)
def _scaled_pair(fmt, row, p):
    """Values [32p, 32p+32) of a row of type fmt as (lo, hi, d, m), the values being q * d + m for
    q the F32x16 lo (first 16) and hi: the codes and the block's scale and offset for Q4_0, Q4_1
    and Q8_0, so that scaling by a coefficient multiplies two scalars instead of 32 lanes; the
    values themselves with d = 1, m = 0 for other formats."""
    if fmt == _Q4_0:
        o = p * 18
        q = load_u8(row, o + 2)
        d = load_f16(row, o)
        return to_f32(q & 15), to_f32(q >> 4), d, np.float32(-8.0) * d
    elif fmt == _Q4_1:
        o = p * 20
        q = load_u8(row, o + 4)
        return to_f32(q & 15), to_f32(q >> 4), load_f16(row, o), load_f16(row, o + 2)
    elif fmt == _Q8_0:
        o = p * 34
        return to_f32(load_i8(row, o + 2)), to_f32(load_i8(row, o + 18)), load_f16(row, o), np.float32(0.0)
    return decode(fmt, row, 2 * p), decode(fmt, row, 2 * p + 1), np.float32(1.0), np.float32(0.0)


@njit(**HELPER)
def _axpy_pairs(fmt, w, rows, coeffs, out, span):
    """out[32p:32p+32] = sum over k of coeffs[k] * W[rows[k], 32p:32p+32] for pairs of 16-value groups
    p in span = (lo, hi, last_chunk), and the unpaired last group, where out has an odd number of
    groups (float formats only), in the last chunk.

    Rows outer, four at a time (one load and store of out per four rows), so each active row's
    segment streams from memory once, the next four prefetched a line per row and step alongside
    (in one burst they stalled the loop: 13 against 40 GB/s on one thread); zero coefficients are skipped; k
    ascends, so the sums do not depend on the chunking. Per block, the four rows' scales and offsets
    are combined with their coefficients as scalars: one multiply-add per lane and row."""
    lo, hi, last_chunk = span
    n_groups = out.shape[0] // LANES
    odd = last_chunk and n_groups & 1
    live = np.empty(rows.shape[0], np.int64)
    n = 0
    for k in range(rows.shape[0]):
        if coeffs[k] != 0.0:
            live[n] = k
            n += 1
    for g in range(2 * lo, 2 * hi + odd):
        store_f32(out, g * LANES, zeros())
    pair_bytes = 2 * w.shape[1] // n_groups
    for j in range(0, n, 4):
        # the next four rows, prefetched a piece per step alongside these
        n0, n1, n2, n3 = (w[rows[live[min(j + 4, n - 1)]]], w[rows[live[min(j + 5, n - 1)]]],
                          w[rows[live[min(j + 6, n - 1)]]], w[rows[live[min(j + 7, n - 1)]]])
        # past the last live row, repeat it with coefficient 0
        k0, k1, k2, k3 = live[j], live[min(j + 1, n - 1)], live[min(j + 2, n - 1)], live[min(j + 3, n - 1)]
        c0 = coeffs[k0]
        c1 = coeffs[k1] if j + 1 < n else np.float32(0.0)
        c2 = coeffs[k2] if j + 2 < n else np.float32(0.0)
        c3 = coeffs[k3] if j + 3 < n else np.float32(0.0)
        r0, r1, r2, r3 = w[rows[k0]], w[rows[k1]], w[rows[k2]], w[rows[k3]]
        for p in range(lo, hi):
            prefetch(n0, p * pair_bytes)
            prefetch(n1, p * pair_bytes)
            prefetch(n2, p * pair_bytes)
            prefetch(n3, p * pair_bytes)
            lo0, hi0, d0, m0 = _scaled_pair(fmt, r0, p)
            lo1, hi1, d1, m1 = _scaled_pair(fmt, r1, p)
            lo2, hi2, d2, m2 = _scaled_pair(fmt, r2, p)
            lo3, hi3, d3, m3 = _scaled_pair(fmt, r3, p)
            m = m0 * c0 + m1 * c1 + m2 * c2 + m3 * c3
            e0, e1, e2, e3 = d0 * c0, d1 * c1, d2 * c2, d3 * c3
            g = 2 * p * LANES
            acc = load_f32(out, g) + m + lo0 * e0
            store_f32(out, g, acc + lo1 * e1 + lo2 * e2 + lo3 * e3)
            acc = load_f32(out, g + LANES) + m + hi0 * e0
            store_f32(out, g + LANES, acc + hi1 * e1 + hi2 * e2 + hi3 * e3)
        if odd:
            g = n_groups - 1
            acc = load_f32(out, g * LANES) + decode(fmt, r0, g) * c0
            acc = acc + decode(fmt, r1, g) * c1
            acc = acc + decode(fmt, r2, g) * c2
            store_f32(out, g * LANES, acc + decode(fmt, r3, g) * c3)


@njit(**HELPER)
def _balanced_bounds(rows, n_chunks):
    """Chunk bounds over rows int32[n] (n_chunks + 1 of them) that give each chunk about the same
    cost, a row costing 1 and one that does not follow its predecessor in memory JUMP more."""
    n = rows.shape[0]
    cost = np.empty(n + 1, np.float64)
    cost[0] = 0.0
    for k in range(n):
        cost[k + 1] = cost[k] + 1.0 + (JUMP if k == 0 or rows[k] != rows[k - 1] + 1 else 0.0)
    bounds = np.empty(n_chunks + 1, np.int64)
    k = 0
    for c in range(n_chunks + 1):
        while k < n and cost[k] < cost[n] * c / n_chunks:
            k += 1
        bounds[c] = k
    return bounds


@njit(**PARALLEL)
def gather_matvec(fmt, w, rows, x, out, n_chunks):
    """out[k] = W[rows[k]] @ x, each row's dot product as matvec computes it. Chunks of rows share
    the cost, not the count (_balanced_bounds): in a converted file's hottest-first order, the rows
    of a predicted set run together at the front and scatter towards the end.

    fmt: GGML type code, a compile-time constant; w: uint8[n_out, row_bytes]; rows: int32[n], each
    in [0, n_out); x: float32[n_in]; out: float32[n], written; n_chunks: chunks of rows, one per thread.
    """
    xin = q8_input(fmt, x)
    bounds = _balanced_bounds(rows, n_chunks)
    for c in prange(n_chunks):
        _gather_dots(fmt, w, rows, x, xin, out, (bounds[c], bounds[c + 1]))


@njit(**SHARED_PARALLEL)
def sparse_axpy(fmt, w, rows, coeffs, out, n_chunks):
    """out = sum over k of coeffs[k] * W[rows[k]] (dequantised): the down projection over active neurons.

    fmt: GGML type code, a compile-time constant; w: uint8[n_ff, row_bytes] neuron-major, n_embd
    values per row, n_embd a multiple of 16; rows: int32[n], each in [0, n_ff); coeffs: float32[n];
    out: float32[n_embd], written; n_chunks: chunks of 32-value column pairs of groups, one per thread.
    """
    n_pairs = out.shape[0] // (2 * LANES)
    for c in prange(n_chunks):
        _axpy_pairs(fmt, w, rows, coeffs, out, (c * n_pairs // n_chunks, (c + 1) * n_pairs // n_chunks,
                                                c == n_chunks - 1))


@njit(**HELPER)
def _axpy_batch_pairs(fmt, w, coeffs_t, out, span):
    """out[t, 32p:32p+32] = sum over rows i of coeffs_t[i, t] * W[i, 32p:32p+32] for every token t and
    pair of 16-value groups p in span = (lo, hi, last_chunk), with the unpaired last group (float
    formats) in the last chunk. Rows ascend; a live row's block is decoded once for all its tokens, the
    next row prefetched a line per step alongside."""
    lo, hi, last_chunk = span
    T, n_groups = out.shape[0], out.shape[1] // LANES
    odd = last_chunk and n_groups & 1
    for t in range(T):
        for g in range(2 * lo, 2 * hi + odd):
            store_f32(out[t], g * LANES, zeros())
    pair_bytes = 2 * w.shape[1] // n_groups
    live = np.empty(T, np.int64)
    for i in range(w.shape[0]):
        n = 0
        for t in range(T):
            if coeffs_t[i, t] != 0.0:
                live[n] = t
                n += 1
        if n == 0:
            continue
        row, ahead = w[i], w[min(i + 1, w.shape[0] - 1)]
        for p in range(lo, hi):
            prefetch(ahead, p * pair_bytes)
            q_lo, q_hi, d, m = _scaled_pair(fmt, row, p)
            g = 2 * p * LANES
            for j in range(n):
                t = live[j]
                c = coeffs_t[i, t]
                e = d * c
                store_f32(out[t], g, load_f32(out[t], g) + m * c + q_lo * e)
                store_f32(out[t], g + LANES, load_f32(out[t], g + LANES) + m * c + q_hi * e)
        if odd:
            g = (n_groups - 1) * LANES
            v = decode(fmt, row, n_groups - 1)
            for j in range(n):
                t = live[j]
                store_f32(out[t], g, load_f32(out[t], g) + v * coeffs_t[i, t])


@njit(**SHARED_PARALLEL)
def sparse_axpy_batch(fmt, w, coeffs_t, out, n_chunks):
    """out[t] = sum over rows i of coeffs_t[i, t] * W[i] for T tokens at once: a batch's down projection
    over each token's active neurons, reading each live row of the neuron-major W once rather than once
    per token. coeffs_t: float32[n_ff, T] (zeros skipped); out: float32[T, n_embd], written. The sums
    run row by row, ascending: the same terms as sparse_axpy's per token, rounded in another grouping."""
    n_pairs = out.shape[1] // (2 * LANES)
    for c in prange(n_chunks):
        _axpy_batch_pairs(fmt, w, coeffs_t, out, (c * n_pairs // n_chunks, (c + 1) * n_pairs // n_chunks,
                                                   c == n_chunks - 1))


@njit(**SERIAL_KERNEL)
def select_active(logits, threshold, out):
    """Indices i of logits f32[n] with logits[i] >= threshold, ascending, into out int32[n]; returns the count."""
    n = 0
    for i in range(logits.shape[0]):
        if logits[i] >= threshold:
            out[n] = i
            n += 1
    return n


@njit(inline="always", **HELPER)
def mlp_select(fmt1, w1, fmt2, w2, threshold, x, h, logits, idx, n_chunks):
    """A predictor's decode step: logits = fc2 @ relu(fc1 @ x), then the indices of the logits >=
    threshold into idx (ascending); returns their count.

    fmt1, fmt2: GGML type codes (compile-time constants) of w1 and w2, uint8 blocks [n_out, row_bytes]
    of [rank, n_in] and [n_ff, rank]; x f32[n_in]; h f32[rank], logits f32[n_ff], idx int32[n_ff]: written.
    """
    matvec(fmt1, w1, x, h, n_chunks)
    for i in range(h.shape[0]):
        h[i] = max(h[i], np.float32(0.0))
    matvec(fmt2, w2, h, logits, n_chunks)
    return select_active(logits, threshold, idx)


@njit(**PARALLEL)
def sparse_ffn(gu_fmt, gate_up, down_fmt, down, act_kind, act_threshold, idx, x, out, n_chunks):
    """out = down @ (act(gate @ x) * (up @ x)) over the neurons idx only: one decode step of the FFN.

    gate_up: uint8 blocks of type gu_fmt [2 * n_ff, n_embd], neuron i's gate row at 2i, its up row
    at 2i + 1; down: blocks of type down_fmt, neuron-major [n_ff, n_embd] (the formats compile-time
    constants); act_kind, act_threshold as ops.gated; idx int32[n], each in [0, n_ff); x f32[n_embd]
    (rounded as the gate_up type takes it); out f32[n_embd], written. Neurons whose activation is
    zero are skipped by the axpy.
    """
    n = idx.shape[0]
    rows = np.empty(2 * n, np.int32)
    for k in range(n):
        rows[2 * k] = 2 * idx[k]
        rows[2 * k + 1] = 2 * idx[k] + 1
    dots = np.empty(2 * n, np.float32)
    gather_matvec(gu_fmt, gate_up, rows, x, dots, n_chunks)
    coeffs = np.empty(n, np.float32)
    for k in range(n):
        coeffs[k] = gated(dots[2 * k], dots[2 * k + 1], act_kind, act_threshold)
    sparse_axpy(down_fmt, down, idx, coeffs, out, n_chunks)


# ---- entry kernels: one cached dispatcher per format (or pair of formats), as in cpu.py ---------

@functools.cache
def gather_matvec_for(fmt: int):
    """gather_matvec(fmt, ...) as a cached kernel of (w, rows, x, out, n_chunks)."""
    @njit(**KERNEL)
    def gather_matvec_fmt(w, rows, x, out, n_chunks):
        gather_matvec(fmt, w, rows, x, out, n_chunks)
    return gather_matvec_fmt


@functools.cache
def sparse_axpy_for(fmt: int):
    """sparse_axpy(fmt, ...) as a cached kernel of (w, rows, coeffs, out, n_chunks)."""
    @njit(**SERIAL_KERNEL)
    def sparse_axpy_fmt(w, rows, coeffs, out, n_chunks):
        sparse_axpy(fmt, w, rows, coeffs, out, n_chunks)
    return sparse_axpy_fmt


@functools.cache
def sparse_axpy_batch_for(fmt: int):
    """sparse_axpy_batch(fmt, ...) as a cached kernel of (w, coeffs_t, out, n_chunks)."""
    @njit(**SERIAL_KERNEL)
    def sparse_axpy_batch_fmt(w, coeffs_t, out, n_chunks):
        sparse_axpy_batch(fmt, w, coeffs_t, out, n_chunks)
    return sparse_axpy_batch_fmt


@functools.cache
def mlp_select_for(fmt1: int, fmt2: int):
    """mlp_select(fmt1, w1, fmt2, w2, ...) as a cached kernel of (w1, w2, threshold, x, h, logits, idx, n_chunks)."""
    @njit(**SERIAL_KERNEL)
    def mlp_select_fmt(w1, w2, threshold, x, h, logits, idx, n_chunks):
        return mlp_select(fmt1, w1, fmt2, w2, threshold, x, h, logits, idx, n_chunks)
    return mlp_select_fmt


@functools.cache
def sparse_ffn_for(gu_fmt: int, down_fmt: int):
    """sparse_ffn(gu_fmt, gate_up, down_fmt, down, ...) as a cached kernel of (gate_up, down, act_kind,
    act_threshold, idx, x, out, n_chunks)."""
    @njit(**KERNEL)
    def sparse_ffn_fmt(gate_up, down, act_kind, act_threshold, idx, x, out, n_chunks):
        sparse_ffn(gu_fmt, gate_up, down_fmt, down, act_kind, act_threshold, idx, x, out, n_chunks)
    return sparse_ffn_fmt

"""Numba kernels that touch only the active FFN neurons, over GGUF blocks read in place.

gather_matvec: the dot products of a list of rows of gate or up with x. sparse_axpy: the sum of
the active neurons' down columns, each stored as one contiguous row of a neuron-major matrix,
scaled by their activations. Both are generic in the format through cpu.with_format, as the dense
kernels are; callers (kernels/__init__.py) check shapes and index ranges.
"""

import numpy as np
from numba import njit, prange

from kernels.config import HELPER, KERNEL
from kernels.cpu import decode, q8_input, row_dot, tail_buffers, with_format
from kernels.simd import LANES, load_f32, prefetch, store_f32, zeros


@njit(**HELPER)
def _prefetch_bytes(row, lo, hi):
    """Prefetch the cache lines of row[lo:hi]: the next active row while this one is computed, since
    rows picked out of order defeat the hardware's stream prefetcher."""
    for i in range(lo, hi, 64):
        prefetch(row, i)


@njit(**HELPER)
def _gather_dots(fmt, w, rows, inputs, out, span):
    """out[k] = dot(W[rows[k]], x) for k in span = (lo, hi); inputs = (x, q8_input(fmt, x))."""
    lo, hi = span
    x, xin = inputs
    wbuf, xbuf = tail_buffers(x)
    for k in range(lo, hi):
        _prefetch_bytes(w[rows[min(k + 1, hi - 1)]], 0, w.shape[1])
        out[k] = row_dot(fmt, w[rows[k]], x, xin, wbuf, xbuf)


@njit(**HELPER)
def _axpy_groups(fmt, w, rows, coeffs, out, span):
    """out[16g:16g+16] = sum over k of coeffs[k] * W[rows[k], 16g:16g+16] for groups g in span = (lo, hi).

    Rows outer, four at a time (one load and store of out per four rows), so each active row's
    segment streams from memory once, the next four prefetched; zero coefficients are skipped; k
    ascends, so the sums do not depend on the chunking."""
    lo, hi = span
    n_groups = out.shape[0] // LANES
    first, last = lo * w.shape[1] // n_groups, hi * w.shape[1] // n_groups  # this span's bytes of a row
    live = np.empty(rows.shape[0], np.int64)
    n = 0
    for k in range(rows.shape[0]):
        if coeffs[k] != 0.0:
            live[n] = k
            n += 1
    for g in range(lo, hi):
        store_f32(out, g * LANES, zeros())
    for j in range(0, n, 4):
        for i in range(j + 4, min(j + 8, n)):
            _prefetch_bytes(w[rows[live[i]]], first, last)
        # past the last live row, repeat it with coefficient 0
        k0, k1, k2, k3 = live[j], live[min(j + 1, n - 1)], live[min(j + 2, n - 1)], live[min(j + 3, n - 1)]
        c0 = coeffs[k0]
        c1 = coeffs[k1] if j + 1 < n else np.float32(0.0)
        c2 = coeffs[k2] if j + 2 < n else np.float32(0.0)
        c3 = coeffs[k3] if j + 3 < n else np.float32(0.0)
        r0, r1, r2, r3 = w[rows[k0]], w[rows[k1]], w[rows[k2]], w[rows[k3]]
        for g in range(lo, hi):
            acc = load_f32(out, g * LANES) + decode(fmt, r0, g) * c0
            acc = acc + decode(fmt, r1, g) * c1
            acc = acc + decode(fmt, r2, g) * c2
            store_f32(out, g * LANES, acc + decode(fmt, r3, g) * c3)


# the format dispatch outside the prange bodies, as in cpu.py (twice as fast there)

@njit(**HELPER)
def _gather_chunk(fmt, w, rows, x, xin, out, span):
    with_format(fmt, _gather_dots, w, rows, (x, xin), out, span)


@njit(**HELPER)
def _axpy_chunk(fmt, w, rows, coeffs, out, span):
    with_format(fmt, _axpy_groups, w, rows, coeffs, out, span)


@njit(**KERNEL)
def gather_matvec(fmt, w, rows, x, out, n_chunks):
    """out[k] = W[rows[k]] @ x, each row's dot product as matvec computes it.

    fmt: GGML type code; w: uint8[n_out, row_bytes]; rows: int32[n], each in [0, n_out);
    x: float32[n_in]; out: float32[n], written; n_chunks: chunks of rows, one per thread.
    """
    n = rows.shape[0]
    xin = q8_input(fmt, x)
    for c in prange(n_chunks):
        _gather_chunk(fmt, w, rows, x, xin, out, (c * n // n_chunks, (c + 1) * n // n_chunks))


@njit(**KERNEL)
def sparse_axpy(fmt, w, rows, coeffs, out, n_chunks):
    """out = sum over k of coeffs[k] * W[rows[k]] (dequantised): the down projection over active neurons.

    fmt: GGML type code; w: uint8[n_ff, row_bytes] neuron-major, n_embd values per row, n_embd a
    multiple of 16; rows: int32[n], each in [0, n_ff); coeffs: float32[n]; out: float32[n_embd],
    written; n_chunks: chunks of 16-value column groups, one per thread.
    """
    n_groups = out.shape[0] // LANES
    for c in prange(n_chunks):
        _axpy_chunk(fmt, w, rows, coeffs, out, (c * n_groups // n_chunks, (c + 1) * n_groups // n_chunks))

"""One decode step's attention block (one token) in one numba call: RMSNorm, the q, k and v
projections, RoPE, the f16 KV cache write, causal attention, the output projection and the residual,
the same steps the model composes for a batch of tokens, without a return to Python between them;
and the same block, and the FFN, with input sparsity (TEAL) over column layouts (columns.py).

A weight is passed as (input rounding kind, uint8 blocks), its GGML type code a compile-time constant
(attention_decode_for makes the kernel for the four weights' types): the input is rounded first as
ggml rounds it for that type (ops.DOT_ROUNDING) unless the kernel quantises it itself. Callers
(kernels.AttentionDecoder) check every shape once: nothing here checks bounds.
"""

import functools

from numba import njit

from hybridinfer.kernels.columns import input_sparse_matvec
from hybridinfer.kernels.config import HELPER, KERNEL, SERIAL_KERNEL
from hybridinfer.kernels.cpu import matvec
from hybridinfer.kernels.ops import (ROUND_NONE, ROUND_Q8_0, attention, gated, rms_norm, rope, round_for_dot,
                                     store_half_rounded)


@njit(inline="always", **HELPER)
def _project(fmt, weight, x, rounded, out, n_chunks):
    """out[n_out] = W @ x[n_in], x rounded as W's type fmt takes it (into rounded[n_in] where it needs to be)."""
    kind, w = weight
    if kind != ROUND_NONE and kind != ROUND_Q8_0:
        round_for_dot(kind, x.reshape(1, x.shape[0]), rounded.reshape(1, x.shape[0]))
        matvec(fmt, w, rounded, out, n_chunks)
    else:
        matvec(fmt, w, x, out, n_chunks)


@njit(inline="always", **HELPER)
def attention_decode(fmts, x, norm, eps, wq, wk, wv, wo, pos, cos, sin, k_cache, v_cache, scratch, n_chunks):
    """x[1, n_embd] += attn_output(attention(q, k, v)) of the token at position pos, its k and v
    written into k_cache, v_cache [n_head_kv, n_ctx, head_dim] at pos (uint16: f16 bits).

    fmts: the GGML type codes of wq, wk, wv, wo (compile-time constants); norm f32[n_embd]; wq, wk,
    wv, wo: (rounding kind, blocks); cos, sin [n_ctx, rope_dim / 2];
    scratch: (xn [1, n_embd], q [1, n_head, hd], k, v [1, n_head_kv, hd], att [1, n_head, hd],
    y [n_embd], rounded [max n_in], scores [n_head, n_ctx]).
    """
    xn, q, k, v, att, y, rounded, scores = scratch
    rms_norm(x, norm, eps, xn)
    _project(fmts[0], wq, xn[0], rounded, q.reshape(q.size), n_chunks)
    _project(fmts[1], wk, xn[0], rounded, k.reshape(k.size), n_chunks)
    _project(fmts[2], wv, xn[0], rounded, v.reshape(v.size), n_chunks)
    rope(q, k, pos, cos, sin)
    for h in range(k.shape[1]):
        store_half_rounded(k[0, h], k_cache[h, pos])
        store_half_rounded(v[0, h], v_cache[h, pos])
    attention(q, k_cache, v_cache, pos, att, scores)
    _project(fmts[3], wo, att.reshape(att.size), rounded, y, n_chunks)
    for i in range(y.shape[0]):
        x[0, i] += y[i]


@functools.cache
def attention_decode_for(fq: int, fk: int, fv: int, fo: int):
    """attention_decode for weights of types fq, fk, fv, fo, as a cached kernel of its other arguments
    (the types closed over are compile-time constants, as in cpu.py)."""
    @njit(**SERIAL_KERNEL)
    def attention_decode_fmt(x, norm, eps, wq, wk, wv, wo, pos, cos, sin, k_cache, v_cache, scratch, n_chunks):
        attention_decode((fq, fk, fv, fo), x, norm, eps, wq, wk, wv, wo, pos, cos, sin, k_cache, v_cache, scratch,
                         n_chunks)
    return attention_decode_fmt


# ---- input-sparse (TEAL) decode steps: the same blocks over column-major weights -----------------

@njit(inline="always", **HELPER)
def _project_columns(fmt, weight, threshold, x, rounded, out, n_chunks):
    """out[n_out] = W @ (x with |x_j| < threshold dropped), W a column layout (columns.py) of type fmt,
    x rounded as fmt takes it (into rounded[n_in] where it needs to be): weight = (rounding kind,
    (quants, scales, mins))."""
    kind, (quants, scales, mins) = weight
    if kind != ROUND_NONE and kind != ROUND_Q8_0:
        round_for_dot(kind, x.reshape(1, x.shape[0]), rounded.reshape(1, x.shape[0]))
        input_sparse_matvec(fmt, quants, scales, mins, rounded, threshold, out, n_chunks)
    else:
        input_sparse_matvec(fmt, quants, scales, mins, x, threshold, out, n_chunks)


@njit(inline="always", **HELPER)
def input_sparse_attention_decode(fmts, x, norm, eps, wq, wk, wv, wo, thresholds, pos, cos, sin, k_cache, v_cache,
                                  scratch, n_chunks):
    """attention_decode with each projection's inputs below its threshold dropped (thresholds f32[4]:
    q, k, v, output), reading the kept columns of their column layouts only (wq.. as _project_columns
    takes them)."""
    xn, q, k, v, att, y, rounded, scores = scratch
    rms_norm(x, norm, eps, xn)
    _project_columns(fmts[0], wq, thresholds[0], xn[0], rounded, q.reshape(q.size), n_chunks)
    _project_columns(fmts[1], wk, thresholds[1], xn[0], rounded, k.reshape(k.size), n_chunks)
    _project_columns(fmts[2], wv, thresholds[2], xn[0], rounded, v.reshape(v.size), n_chunks)
    rope(q, k, pos, cos, sin)
    for h in range(k.shape[1]):
        store_half_rounded(k[0, h], k_cache[h, pos])
        store_half_rounded(v[0, h], v_cache[h, pos])
    attention(q, k_cache, v_cache, pos, att, scores)
    _project_columns(fmts[3], wo, thresholds[3], att.reshape(att.size), rounded, y, n_chunks)
    for i in range(y.shape[0]):
        x[0, i] += y[i]


@functools.cache
def input_sparse_attention_decode_for(fq: int, fk: int, fv: int, fo: int):
    """input_sparse_attention_decode for column layouts of types fq, fk, fv, fo, as a cached kernel
    (parallel: the column mat-vecs' loops are inlined into it)."""
    @njit(**KERNEL)
    def input_sparse_attention_decode_fmt(x, norm, eps, wq, wk, wv, wo, thresholds, pos, cos, sin, k_cache, v_cache,
                                          scratch, n_chunks):
        input_sparse_attention_decode((fq, fk, fv, fo), x, norm, eps, wq, wk, wv, wo, thresholds, pos, cos, sin,
                                      k_cache, v_cache, scratch, n_chunks)
    return input_sparse_attention_decode_fmt


@functools.cache
def input_sparse_ffn_for(fg: int, fu: int, fd: int):
    """A decode step's FFN with input sparsity, as a cached kernel of (x, wg, wu, wd, thresholds, act_kind,
    act_threshold, out, scratch, n_chunks): out[n_embd] = down(gated(gate(x'), up(x'))') where ' drops
    the inputs below each matrix's threshold (thresholds f32[3]: gate, up, down); the weights as
    _project_columns takes them; scratch (gate [n_ff], up [n_ff], rounded [max n_in]); parallel, as above."""
    @njit(**KERNEL)
    def input_sparse_ffn_fmt(x, wg, wu, wd, thresholds, act_kind, act_threshold, out, scratch, n_chunks):
        gate, up, rounded = scratch
        _project_columns(fg, wg, thresholds[0], x, rounded, gate, n_chunks)
        _project_columns(fu, wu, thresholds[1], x, rounded, up, n_chunks)
        for i in range(gate.shape[0]):
            gate[i] = gated(gate[i], up[i], act_kind, act_threshold)
        _project_columns(fd, wd, thresholds[2], gate, rounded, out, n_chunks)
    return input_sparse_ffn_fmt

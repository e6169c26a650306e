"""One decode step's attention block (one token) in one numba call: RMSNorm, the q, k and v
projections, RoPE, the f16 KV cache write, causal attention, the output projection and the residual,
the same steps the model composes for a batch of tokens, without a return to Python between them.

A weight is passed as (input rounding kind, uint8 blocks), its GGML type code a compile-time constant
(attention_decode_for makes the kernel for the four weights' types): the input is rounded first as
ggml rounds it for that type (ops.DOT_ROUNDING) unless the kernel quantises it itself. Callers
(kernels.AttentionDecoder) check every shape once: nothing here checks bounds.
"""

import functools

from numba import njit

from hybridinfer.kernels.config import HELPER, SERIAL_KERNEL
from hybridinfer.kernels.cpu import matvec
from hybridinfer.kernels.ops import ROUND_NONE, ROUND_Q8_0, attention, rms_norm, rope, round_for_dot, store_half_rounded


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

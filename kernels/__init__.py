"""Weight kernels over GGUF blocks: one entry point per operation, dispatched on the quant type.

A weight matrix is passed as ``(qtype, w)``: ``qtype`` a ``gguf.GGMLQuantizationType`` and ``w`` a
uint8 array of shape (n_out, row_bytes), C-contiguous, holding each output row's GGUF blocks as
memory-mapped (F32/F16/BF16 data viewed as uint8). Blocks are decoded where they lie: no call
copies or dequantises the whole matrix. Any alignment works.

For Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights, matvec, matmul and gather_matvec first quantise x to
8-bit blocks of 32 values, as ggml does (its vec_dot_type), and mat-vecs take exact integer dot
products of the bytes (callers round x to Q8_0 values for Q5_0 and Q5_1 as well: ops.DOT_ROUNDING,
which the GPU side follows; quantising it again gives the same blocks). Q4_K, Q5_K and Q6_K take
integer dots against Q8_K blocks when x is on that grid, as the callers round it; other types, and
other inputs, take x as given.

Every function checks shapes, dtypes and contiguity here, since the numba kernels (kernels/cpu.py)
check no bounds, and raises ValueError on bad input. Results are bit-identical whatever the
thread count: each output row is computed by one thread, always in the same order (threads.py
chooses the count for each call).
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .config import compile_notice, drop_stale_cache  # noqa: F401 (compile_notice: for the CLI)

drop_stale_cache()  # before any kernel loads its cache

from . import columns, cpu, decode, quant, sparse  # noqa: E402
from .ops import DOT_ROUNDING  # noqa: E402
from .threads import get_threads, set_threads, team  # noqa: E402,F401 (get_threads, set_threads: the API)

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
})

_U8, _F32 = np.dtype(np.uint8), np.dtype(np.float32)


def matvec(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[n_out] f32 = W[n_out, n_in] @ x[n_in] f32 (decode: one token)."""
    n_in = _weight(qtype, w)
    _vector(x, n_in, "x", "W's n_in")
    _vector(out, w.shape[0], "out", "W's n_out", writable=True)
    _no_overlap(out, x)
    cpu.matvec_for(int(qtype))(_readonly(w), x, out, team())


def matmul(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[T, n_out] f32 = x[T, n_in] f32 @ W[n_out, n_in].T (prefill: T tokens).

    T <= 2 runs matvec per token. Otherwise each thread dequantises tiles of its rows (256 KiB of f32)
    and multiplies them with all tokens in numba: BLAS would add a second thread pool, and on few
    cores its threads and numba's spin against each other (3x slower here).
    """
    n_in = _weight(qtype, w)
    _matrix(x, None, n_in, "x", "(T, W's n_in)")
    _matrix(out, x.shape[0], w.shape[0], "out", "(x's T, W's n_out)", writable=True)
    _no_overlap(out, x)
    if x.shape[0] <= 2:  # one mat-vec per token is faster below the 4-token register block
        for t in range(x.shape[0]):
            cpu.matvec_for(int(qtype))(_readonly(w), x[t], out[t], team())
    else:
        cpu.matmul_for(int(qtype))(_readonly(w), x, out, team())


def get_rows(qtype: GGMLQuantizationType, w: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[T, n_in] f32 = W[ids] dequantised (embedding lookup); ids: T integers in [0, n_out)."""
    n_in, n_out = _weight(qtype, w), w.shape[0]
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"ids must be a 1-D integer array, got {_describe(ids)}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_out):
        raise ValueError(f"ids must lie in [0, {n_out}) since W has {n_out} rows, got values from "
                         f"{ids.min()} to {ids.max()}")
    _matrix(out, ids.size, n_in, "out", "(len(ids), W's n_in)", writable=True)
    ids = np.array(ids, dtype=np.int64)  # a writable copy: the type matmul's tile loop uses, one compile
    cpu.get_rows_for(int(qtype))(_readonly(w), ids, out, team())


def gather_matvec(qtype: GGMLQuantizationType, w: np.ndarray, rows: np.ndarray, x: np.ndarray,
                  out: np.ndarray) -> None:
    """out[n] f32 = W[rows] @ x[n_in] f32: the active rows of gate or up; rows int32[n] in [0, n_out)."""
    n_in = _weight(qtype, w)
    _rows(rows, w.shape[0])
    _vector(x, n_in, "x", "W's n_in")
    _vector(out, rows.shape[0], "out", "len(rows)", writable=True)
    _no_overlap(out, x)
    sparse.gather_matvec_for(int(qtype))(_readonly(w), rows, x, out, team())


def sparse_axpy(qtype: GGMLQuantizationType, w: np.ndarray, rows: np.ndarray, coeffs: np.ndarray,
                out: np.ndarray) -> None:
    """out[n_embd] f32 = sum_k coeffs[k] * W[rows[k]]: the down projection over active neurons, W the
    neuron-major down matrix [n_ff, n_embd]; rows int32[n] in [0, n_ff), coeffs f32[n] (zeros skipped)."""
    n_embd = _weight(qtype, w)
    if n_embd % 16:
        raise ValueError(f"sparse_axpy needs rows of a multiple of 16 values, got {n_embd}")
    _rows(rows, w.shape[0])
    _vector(coeffs, rows.shape[0], "coeffs", "len(rows)")
    _vector(out, n_embd, "out", "W's row length", writable=True)
    _no_overlap(out, coeffs)
    sparse.sparse_axpy_for(int(qtype))(_readonly(w), rows, coeffs, out, team())


def sparse_axpy_batch(qtype: GGMLQuantizationType, w: np.ndarray, coeffs_t: np.ndarray, out: np.ndarray) -> None:
    """out[t] f32 = sum_i coeffs_t[i, t] * W[i] for T tokens at once (a batch's down projection over
    each token's active neurons, each live row of the neuron-major W [n_ff, n_embd] read once);
    coeffs_t f32 [n_ff, T] (zeros skipped), out f32 [T, n_embd]."""
    n_embd = _weight(qtype, w)
    if n_embd % 16:
        raise ValueError(f"sparse_axpy_batch needs rows of a multiple of 16 values, got {n_embd}")
    _matrix(out, None, n_embd, "out", "(T, n_embd)", writable=True)
    _matrix(coeffs_t, w.shape[0], out.shape[0], "coeffs_t", "(n_ff, T)")
    _no_overlap(out, coeffs_t)
    sparse.sparse_axpy_batch_for(int(qtype))(_readonly(w), coeffs_t, out, team())


def mlp_select(fc1: tuple, fc2: tuple, threshold: float, x: np.ndarray, h: np.ndarray, logits: np.ndarray,
               idx: np.ndarray) -> int:
    """A predictor's decode step in one call: logits[n_ff] = W2 @ relu(W1 @ x), and the indices of the
    logits >= threshold written ascending into idx int32[n_ff]; returns their count. fc1, fc2:
    (qtype, w) of W1 [rank, n_in] and W2 [n_ff, rank]; h f32[rank] and logits are scratch, written."""
    n_in, rank = _weight(*fc1), _weight(*fc2)
    _vector(x, n_in, "x", "fc1's n_in")
    _vector(h, fc1[1].shape[0], "h", "fc1's n_out", writable=True)
    _vector(logits, fc2[1].shape[0], "logits", "fc2's n_out", writable=True)
    if h.shape[0] != rank:
        raise ValueError(f"fc2 takes {rank} inputs but fc1 gives {h.shape[0]}")
    if not isinstance(idx, np.ndarray) or idx.dtype != np.int32 or idx.shape != logits.shape or not idx.flags.writeable:
        raise ValueError(f"idx must be a writable int32 array of shape {logits.shape}, got {_describe(idx)}")
    kernel = sparse.mlp_select_for(int(fc1[0]), int(fc2[0]))
    return kernel(_readonly(fc1[1]), _readonly(fc2[1]), np.float32(threshold), x, h, logits, idx, team())


def sparse_ffn(gate_up: tuple, down: tuple, act_kind: int, act_threshold: float, idx: np.ndarray,
               x: np.ndarray, out: np.ndarray) -> None:
    """out[n_embd] = the FFN of x over the neurons idx only, in one call: the gathered gate and up
    rows, the activation (ops.gated: SILU, RELU, FATRELU or DRELU), the sparse axpy of down.

    gate_up: (qtype, w) [2 * n_ff, n_embd] with neuron i's gate row at 2i and up row at 2i + 1 (x
    rounded as that type takes it); down: (qtype, w) neuron-major [n_ff, n_embd]; idx int32 in [0, n_ff)."""
    n_embd, n_ff = _weight(*gate_up), down[1].shape[0]
    if _weight(*down) != n_embd or gate_up[1].shape[0] != 2 * n_ff:
        raise ValueError(f"gate_up {gate_up[1].shape[0]} x {n_embd} does not match down {n_ff} x "
                         f"{_weight(*down)}: expected [2 * n_ff, n_embd] and [n_ff, n_embd]")
    if n_embd % 16:
        raise ValueError(f"sparse_ffn needs rows of a multiple of 16 values, got {n_embd}")
    _rows(idx, n_ff)
    _vector(x, n_embd, "x", "n_embd")
    _vector(out, n_embd, "out", "n_embd", writable=True)
    _no_overlap(out, x)
    kernel = sparse.sparse_ffn_for(int(gate_up[0]), int(down[0]))
    kernel(_readonly(gate_up[1]), _readonly(down[1]), int(act_kind), np.float32(act_threshold), idx, x, out, team())


# the types whose numbers the column layout keeps as they are; others are rounded to Q8_0 first
COLUMN_TYPES = frozenset({
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.F32,
})


@dataclass(frozen=True)
class ColumnMatrix:
    """A weight matrix W [n_out, n_in] stored column by column for input_sparse_matvec (the layout:
    kernels/columns.py). qtype: the layout's type, the file's own for COLUMN_TYPES (the same numbers),
    Q8_0 for the others; quants, scales, mins: read-only uint8 1-D arrays of columns.layout's sizes;
    nbytes: their bytes together."""
    qtype: GGMLQuantizationType
    n_out: int
    n_in: int
    quants: np.ndarray
    scales: np.ndarray
    mins: np.ndarray

    def __post_init__(self):
        if self.qtype not in COLUMN_TYPES or self.n_out < 1 or self.n_in < 1 or self.n_in % 32:
            raise ValueError(f"a ColumnMatrix of {getattr(self.qtype, 'name', self.qtype)!r} {self.n_out} x "
                             f"{self.n_in}: expected one of {', '.join(sorted(t.name for t in COLUMN_TYPES))} and "
                             f"n_in a positive multiple of 32; build it with kernels.column_matrix")
        n_pad, stride, n_scales, n_mins = columns.layout(int(self.qtype), self.n_out, self.n_in)
        for a, name, size in ((self.quants, "quants", self.n_in * stride), (self.scales, "scales", n_scales),
                              (self.mins, "mins", n_mins)):
            if (not isinstance(a, np.ndarray) or a.dtype != _U8 or a.shape != (size,) or not a.flags.c_contiguous
                    or a.flags.writeable):
                raise ValueError(f"ColumnMatrix {name} must be a read-only contiguous uint8 array of shape ({size},), "
                                 f"got {_describe(a)}; build it with kernels.column_matrix")

    @property
    def nbytes(self) -> int:
        return self.quants.nbytes + self.scales.nbytes + self.mins.nbytes


def column_matrix(qtype: GGMLQuantizationType, w: np.ndarray) -> ColumnMatrix:
    """W [n_out, n_in] (the file's blocks, as matvec takes them; n_in a multiple of 32) in the column
    layout of input_sparse_matvec: the same numbers for COLUMN_TYPES; other types (K-quants, Q5_0, Q5_1)
    are dequantised and rounded to Q8_0 first, a second rounding."""
    n_in = _weight(qtype, w)
    if n_in % 32:
        raise ValueError(f"column_matrix needs n_in a multiple of 32 (blocks of 32 inputs), got {n_in}")
    if qtype not in COLUMN_TYPES:
        w, qtype = _to_q8_0(qtype, w, n_in), GGMLQuantizationType.Q8_0
    quants, scales, mins = columns.allocate(int(qtype), w.shape[0], n_in)
    columns.build_columns_for(int(qtype))(_readonly(w), quants, scales, mins, team())
    for a in (quants, scales, mins):
        a.flags.writeable = False
    return ColumnMatrix(qtype, w.shape[0], n_in, quants, scales, mins)


def input_sparse_matvec(cm: ColumnMatrix, x: np.ndarray, threshold: float, out: np.ndarray) -> None:
    """out[n_out] f32 = W @ x' where x' is x[n_in] f32 with the entries below threshold in magnitude
    (and NaNs) set to 0 (TEAL's input sparsity; threshold 0 keeps all), reading only the kept columns
    of cm (column_matrix). For Q4_0, Q4_1 and Q8_0, the terms of matvec(qtype, w, x', out), summed in
    another order; threshold is compared as float32."""
    if not isinstance(cm, ColumnMatrix):
        raise ValueError(f"cm must be a ColumnMatrix (kernels.column_matrix), got {type(cm).__name__}")
    _vector(x, cm.n_in, "x", "the matrix's n_in")
    _vector(out, cm.n_out, "out", "the matrix's n_out", writable=True)
    _no_overlap(out, x)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    kernel = columns.input_sparse_matvec_for(int(cm.qtype))
    kernel(cm.quants, cm.scales, cm.mins, x, np.float32(threshold), out, team())


def _to_q8_0(qtype, w, n_in, rows=1024) -> np.ndarray:
    """The blocks w of type qtype dequantised and rounded to Q8_0, rows at a time."""
    out = np.empty((w.shape[0], n_in // 32 * 34), np.uint8)
    values = np.empty((min(rows, w.shape[0]), n_in), np.float32)
    for r in range(0, w.shape[0], rows):
        part = w[r:r + rows]
        cpu.get_rows_for(int(qtype))(_readonly(part), np.arange(part.shape[0]), values[:part.shape[0]], team())
        out[r:r + rows] = quant.quantize(values[:part.shape[0]], GGMLQuantizationType.Q8_0)
    return out


class AttentionDecoder:
    """One layer's attention block for one token, in one kernel call (kernels/decode.py): x[1, n_embd] +=
    attn_output(attention) of the token at pos, its k and v stored in the layer's f16 cache.

    Every shape is checked here, once: the weights (qtype, input rounding kind of ops.DOT_ROUNDING, w)
    of q [n_head * hd, n_embd], k and v [n_head_kv * hd, n_embd] and output [n_embd, n_head * hd],
    norm [n_embd], cos and sin [n_ctx, rope_dim / 2] (float32) and the caches [n_head_kv, n_ctx, hd]
    (float16, writable), all C-contiguous.
    A call checks x and pos.

    With columns = (q, k, v, output ColumnMatrix, thresholds [4]), the projections drop their inputs
    below each one's threshold and read only the kept columns (input sparsity, TEAL).
    """

    def __init__(self, norm, eps, wq, wk, wv, wo, n_head: int, cos, sin, k_cache, v_cache, columns=None):
        for a, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
            if not isinstance(a, np.ndarray) or a.dtype != np.float16 or a.ndim != 3:
                raise ValueError(f"{name} must be a float16 array (n_head_kv, n_ctx, head_dim), got {_describe(a)}")
            _contiguous(a, name, writable=True)
        n_kv, n_ctx, hd = k_cache.shape
        n_embd = _weight(wq[0], wq[2])
        for w, name, n_in, n_out in ((wq, "q", n_embd, n_head * hd), (wk, "k", n_embd, n_kv * hd),
                                     (wv, "v", n_embd, n_kv * hd), (wo, "output", n_head * hd, n_embd)):
            if _weight(w[0], w[2]) != n_in or w[2].shape[0] != n_out:
                raise ValueError(f"attention {name} weight is {w[2].shape[0]} x {_weight(w[0], w[2])}, expected "
                                 f"{n_out} x {n_in}")
        if n_head % n_kv or cos.shape != sin.shape or cos.shape[0] != n_ctx or 2 * cos.shape[1] > hd:
            raise ValueError(f"{n_head} heads, {n_kv} kv heads of {hd}, rope tables {cos.shape} and {sin.shape} "
                             f"for a context of {n_ctx} do not fit together")
        _vector(norm, n_embd, "norm", "n_embd")
        for a, name in ((cos, "cos"), (sin, "sin")):
            _matrix(a, n_ctx, cos.shape[1], name, "(n_ctx, rope_dim / 2)")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_cache {v_cache.shape} differs from k_cache {k_cache.shape}")
        shapes = ((1, n_embd), (1, n_head, hd), (1, n_kv, hd), (1, n_kv, hd), (1, n_head, hd), (n_embd,),
                  (max(n_embd, n_head * hd),), (n_head, n_ctx))  # xn, q, k, v, att, y, rounded input, scores
        scratch = tuple(np.zeros(shape, np.float32) for shape in shapes)
        self.n_embd, self.n_ctx = n_embd, n_ctx
        if columns is None:
            self._kernel = decode.attention_decode_for(*(int(w[0]) for w in (wq, wk, wv, wo)))
            weights = tuple((int(kind), _readonly(w)) for _, kind, w in (wq, wk, wv, wo))
            self._args = (norm, np.float32(eps), *weights)
        else:
            *cms, thresholds = columns
            for cm, w, name in zip(cms, (wq, wk, wv, wo), ("q", "k", "v", "output")):
                if not isinstance(cm, ColumnMatrix) or (cm.n_out, cm.n_in) != (w[2].shape[0], _weight(w[0], w[2])):
                    raise ValueError(f"attention {name} columns must be a ColumnMatrix of the weight's shape, got "
                                     f"{_describe(cm)}")
            self._kernel = decode.input_sparse_attention_decode_for(*(int(cm.qtype) for cm in cms))
            weights = tuple((DOT_ROUNDING[cm.qtype], (cm.quants, cm.scales, cm.mins)) for cm in cms)
            self._args = (norm, np.float32(eps), *weights, _thresholds(thresholds, 4))
        # the kernels read and write the f16 bits (numba has no float16 on the CPU)
        self._rest = (cos, sin, k_cache.view(np.uint16), v_cache.view(np.uint16), scratch)

    def upload_rows(self, start: int, stop: int) -> None:
        """Nothing to do: this decoder reads the caches it was given, where a prefill wrote rows
        start..stop (cuda.AttentionDecoder, which keeps its own copy, takes them here)."""

    def __call__(self, x: np.ndarray, pos: int) -> None:
        _matrix(x, 1, self.n_embd, "x", "(1, n_embd)", writable=True)
        if not 0 <= pos < self.n_ctx:
            raise ValueError(f"position {pos} is outside the cache of {self.n_ctx}")
        self._kernel(x, *self._args, pos, *self._rest, team())


class InputSparseFFNDecoder:
    """One layer's FFN for one token with input sparsity (TEAL), in one kernel call (kernels/decode.py):
    out = down(gated(gate(x'), up(x'))'), ' dropping the inputs below each matrix's threshold, each
    matrix read through its column layout (column_matrix). Shapes checked here, once."""

    def __init__(self, gate: ColumnMatrix, up: ColumnMatrix, down: ColumnMatrix, thresholds, act_kind: int,
                 act_threshold: float):
        for cm, name in ((gate, "gate"), (up, "up"), (down, "down")):
            if not isinstance(cm, ColumnMatrix):
                raise ValueError(f"{name} must be a ColumnMatrix (kernels.column_matrix), got {type(cm).__name__}")
        if (gate.n_in, gate.n_out) != (up.n_in, up.n_out) or (down.n_in, down.n_out) != (gate.n_out, gate.n_in):
            raise ValueError(f"gate {gate.n_out} x {gate.n_in}, up {up.n_out} x {up.n_in} and down {down.n_out} x "
                             f"{down.n_in} do not make an FFN")
        self.n_embd, n_ff = gate.n_in, gate.n_out
        self._thresholds = _thresholds(thresholds, 3)
        self._kernel = decode.input_sparse_ffn_for(*(int(cm.qtype) for cm in (gate, up, down)))
        self._weights = tuple((DOT_ROUNDING[cm.qtype], (cm.quants, cm.scales, cm.mins)) for cm in (gate, up, down))
        self._act = (int(act_kind), np.float32(act_threshold))
        self._scratch = (np.zeros(n_ff, np.float32), np.zeros(n_ff, np.float32), np.zeros(n_ff, np.float32))

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        _vector(x, self.n_embd, "x", "n_embd")
        _vector(out, self.n_embd, "out", "n_embd", writable=True)
        _no_overlap(out, x)
        self._kernel(x, *self._weights, self._thresholds, *self._act, out, self._scratch, team())


def _thresholds(values, n: int) -> np.ndarray:
    t = np.asarray(values, np.float32)
    if t.shape != (n,) or not np.all(t >= 0) or not np.all(np.isfinite(t)):
        raise ValueError(f"thresholds must be {n} finite numbers >= 0, got {values!r}")
    return t


# ---- checks (messages are built only on failure: these run ~200 times per token) ---------------

def _weight(qtype, w) -> int:
    """n_in of a valid weight matrix w of type qtype, else ValueError."""
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"quant type {getattr(qtype, 'name', qtype)!r} is not supported by the kernels "
                         f"(supported: {supported}); dequantize such weights to F32 at load")
    if not isinstance(w, np.ndarray) or (w.dtype is not _U8 and w.dtype != _U8) or w.ndim != 2:
        raise ValueError(f"w must be a uint8 array (n_out, row_bytes) of GGUF blocks, got {_describe(w)}; "
                         f"pass float weights as data.view(np.uint8).reshape(n_out, -1)")
    if not w.flags.c_contiguous:
        raise ValueError(f"w must be C-contiguous, got strides {w.strides}: pass the tensor as "
                         f"memory-mapped, or np.ascontiguousarray it")
    block, size = GGML_QUANT_SIZES[qtype]
    if w.shape[1] == 0 or w.shape[1] % size:
        raise ValueError(f"w rows hold {w.shape[1]} bytes, not a positive multiple of the {size}-byte "
                         f"{GGMLQuantizationType(qtype).name} block: wrong quant type or a mis-shaped tensor")
    return w.shape[1] // size * block


def _rows(rows, n_out):
    if not isinstance(rows, np.ndarray) or rows.dtype != np.int32 or rows.ndim != 1 or not rows.flags.c_contiguous:
        raise ValueError(f"rows must be a contiguous 1-D int32 array, got {_describe(rows)}")
    if rows.size and (rows.min() < 0 or rows.max() >= n_out):
        raise ValueError(f"rows must lie in [0, {n_out}), got values from {rows.min()} to {rows.max()}")


def _vector(a, n, name, size_name, writable=False):
    if not isinstance(a, np.ndarray) or (a.dtype is not _F32 and a.dtype != _F32) or a.shape != (n,):
        raise ValueError(f"{name} must be a float32 array of shape ({n},) ({size_name}), got {_describe(a)}")
    _contiguous(a, name, writable)


def _matrix(a, rows, cols, name, shape_names, writable=False):
    if (not isinstance(a, np.ndarray) or (a.dtype is not _F32 and a.dtype != _F32) or a.ndim != 2
            or a.shape[1] != cols or (rows is not None and a.shape[0] != rows)):
        expected = f"({'T' if rows is None else rows}, {cols})"
        raise ValueError(f"{name} must be a float32 array of shape {expected} {shape_names}, "
                         f"got {_describe(a)}")
    _contiguous(a, name, writable)


def _contiguous(a, name, writable):
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {a.strides}: np.ascontiguousarray it first")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only: pass a writable output array")


def _no_overlap(out, x):
    if np.may_share_memory(out, x):
        raise ValueError("out overlaps x: the kernels write out while reading x; use separate buffers")


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: memory-mapped weights are read-only, and one array type means one compile
    (numba compiles read-only and writable arrays separately)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a

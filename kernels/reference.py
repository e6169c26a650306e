"""Plain NumPy references for the weight kernels, with the gguf package as the decoder.

Same arguments as kernels.matvec / matmul / get_rows, but they return the result (float32) and
dequantise the whole matrix: for tests and checks on small matrices only. For Q4_0, Q4_1, Q5_0, Q5_1
and Q8_0 weights the input is first quantised as ggml quantises it (``quantize_input``), as the kernels do.
"""

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

INTEGER_DOT = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                         GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0})


def quantize_input(x: np.ndarray) -> np.ndarray:
    """x[..., n] (n a multiple of 32) rounded to ggml's Q8_0 blocks: d * q, float32, with d = amax / 127
    stored as f16 and q = rint(x / d)."""
    blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0))
    q = np.minimum(np.float32(127), np.rint(blocks * inv))
    return (d.astype(np.float16).astype(np.float32) * q).reshape(x.shape)


def dequantize(qtype: GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """W[n_out, n_in] float32 from its blocks w: uint8 (n_out, row_bytes)."""
    return np.asarray(_gguf_dequantize(w, qtype), dtype=np.float32).reshape(w.shape[0], -1)


def matvec(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W @ x as ggml's mat-vec computes it, summed in float64: out[n_out] float32."""
    return matmul(qtype, w, x[None, :])[0]


def matmul(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x[T, n_in] @ W.T, summed in float64, x quantised first for INTEGER_DOT types: out[T, n_out] float32."""
    if qtype in INTEGER_DOT:
        x = quantize_input(x)
    return (x.astype(np.float64) @ dequantize(qtype, w).astype(np.float64).T).astype(np.float32)


def get_rows(qtype: GGMLQuantizationType, w: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """W[ids]: out[T, n_in] float32."""
    return dequantize(qtype, w[np.asarray(ids, dtype=np.int64)])


def select_active(logits: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of logits >= threshold, ascending, int32."""
    return np.flatnonzero(logits >= np.float32(threshold)).astype(np.int32)

"""Plain NumPy references for the weight kernels, with the gguf package as the decoder.

Same arguments as kernels.matvec / matmul / get_rows, but they return the result (float32) and
dequantise the whole matrix: for tests and checks on small matrices only.
"""

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize


def dequantize(qtype: GGMLQuantizationType, w: np.ndarray) -> np.ndarray:
    """W[n_out, n_in] float32 from its blocks w: uint8 (n_out, row_bytes)."""
    return np.asarray(_gguf_dequantize(w, qtype), dtype=np.float32).reshape(w.shape[0], -1)


def matvec(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W @ x, summed in float64: out[n_out] float32."""
    return (dequantize(qtype, w).astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def matmul(qtype: GGMLQuantizationType, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """x[T, n_in] @ W.T, summed in float64: out[T, n_out] float32."""
    return (x.astype(np.float64) @ dequantize(qtype, w).astype(np.float64).T).astype(np.float32)


def get_rows(qtype: GGMLQuantizationType, w: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """W[ids]: out[T, n_in] float32."""
    return dequantize(qtype, w[np.asarray(ids, dtype=np.int64)])

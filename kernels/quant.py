"""Weight quantisation to Q8_0, Q4_0 and Q4_1 in numba, bit for bit as the gguf package quantises
(ggml's reference quantisers), for the copies the sparse modes re-arrange at load and for quantised
predictors: the package's NumPy quantisers took about 20 s of a 7B model's load.

No fast-math here: each value is rounded exactly as NumPy rounds it in float32.
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

_EXACT = dict(nogil=True, boundscheck=False, error_model="numpy", cache=True)
_Q8_0, _Q4_0, _Q4_1 = int(GGMLQuantizationType.Q8_0), int(GGMLQuantizationType.Q4_0), int(GGMLQuantizationType.Q4_1)
TYPES = frozenset({GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1})


@njit(**_EXACT)
def _roundf(v):
    """C's roundf (halves away from zero) in float32, as gguf's np_roundf."""
    a = abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(np.float32(2.0) * (a - floored)))


@njit(parallel=True, **_EXACT)
def _quantize_rows(fmt, values, d, m, q):
    """Per block of 32 values of values f32[n, k]: d (and Q4_1's m) as f32 [n, k // 32], and the quants
    in q uint8 [n, k // 32, 32 (Q8_0) or 16 (packed nibbles)]."""
    n, k = values.shape
    for r in prange(n):
        for b in range(k // 32):
            x = values[r, 32 * b:32 * b + 32]
            if fmt == _Q8_0:
                amax = np.float32(0.0)
                for i in range(32):
                    amax = max(amax, abs(x[i]))
                scale = amax / np.float32(127.0)
                inv = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
                for i in range(32):
                    q[r, b, i] = np.uint8(np.int8(_roundf(x[i] * inv)))
            else:
                if fmt == _Q4_0:
                    peak = x[0]
                    for i in range(1, 32):
                        if abs(x[i]) > abs(peak):
                            peak = x[i]
                    scale, low, offset = peak / np.float32(-8.0), np.float32(0.0), np.float32(8.5)
                else:
                    low, high = x[0], x[0]
                    for i in range(1, 32):
                        low, high = min(low, x[i]), max(high, x[i])
                    scale, offset = (high - low) / np.float32(15.0), np.float32(0.5)
                    m[r, b] = low
                inv = np.float32(1.0) / scale if scale != 0 else np.float32(0.0)
                for i in range(16):
                    lo = min(15, int(np.trunc((x[i] - low) * inv + offset)))
                    hi = min(15, int(np.trunc((x[i + 16] - low) * inv + offset)))
                    q[r, b, i] = np.uint8(lo | (hi << 4))
            d[r, b] = scale


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """values f32 [n, k] (any strides; k a multiple of 32) as uint8 [n, row_bytes] of qtype blocks,
    equal byte for byte to gguf.quants.quantize(values, qtype); qtype one of TYPES."""
    n, k = values.shape
    values = values.astype(np.float32, copy=False)
    n_blocks = k // GGML_QUANT_SIZES[qtype][0]
    d = np.empty((n, n_blocks), np.float32)
    m = np.zeros((n, n_blocks), np.float32)
    q = np.empty((n, n_blocks, 32 if qtype == GGMLQuantizationType.Q8_0 else 16), np.uint8)
    _quantize_rows(int(qtype), values, d, m, q)
    parts = [d.astype(np.float16).view(np.uint8).reshape(n, n_blocks, 2)]
    if qtype == GGMLQuantizationType.Q4_1:
        parts.append(m.astype(np.float16).view(np.uint8).reshape(n, n_blocks, 2))
    return np.concatenate(parts + [q], axis=-1).reshape(n, -1)

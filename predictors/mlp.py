"""The runtime predictor: per layer logits = fc2 @ relu(fc1 @ x), a neuron active when logit >= threshold.

NumPy and the project's kernels only (no torch, nothing from the engine). The weights run through
kernels.mlp_select (decode, one call) and kernels.matmul (batches) as F16, as stored, or quantised
at load to Q8_0 (half the bytes read per token) or Q4_0 (about a quarter; see PREDICTOR_QTYPES).
Scratch buffers are allocated once: the decode call, active_indices, allocates only its result.
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from hybridinfer import kernels
from hybridinfer.kernels import quant
from hybridinfer.predictors.format import Fingerprint, PredictorError, PredictorWeights, load

F16, Q8_0, Q4_0 = GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0
PREDICTOR_QTYPES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
DEFAULT_QTYPE = "f16"
_BLOCK = 32  # values per Q8_0 / Q4_0 block


class _Layer:
    """One layer's two matrices as kernel operands: (qtype, uint8 blocks [n_out, row_bytes])."""

    def __init__(self, fc1: tuple, fc2: tuple, threshold: float):
        self.rank = fc1[1].shape[0]
        self.threshold = np.float32(threshold)
        self.fc1, self.fc2 = fc1, fc2

    @property
    def nbytes(self) -> int:
        return self.fc1[1].nbytes + self.fc2[1].nbytes


def operand(w: np.ndarray, qtype: GGMLQuantizationType) -> tuple[GGMLQuantizationType, np.ndarray]:
    """w f16/f32 [n_out, n_in] as the kernel operand a predictor of qtype runs with."""
    # Q8_0 and Q4_0 need rows in whole 32-value blocks; other rows stay F16
    if qtype != F16 and w.shape[1] % _BLOCK == 0:
        blocks = quant.quantize(w.astype(np.float32), qtype)
    else:
        w16 = np.array(w, np.float16, order="C")  # a copy: the caller's arrays stay theirs
        qtype, blocks = F16, w16.view(np.uint8).reshape(w16.shape[0], -1)
    blocks.flags.writeable = False  # as kernels take weights: read-only, so no view per call
    return qtype, blocks


class PredictorSet:
    """Every layer's predictor, ready to run. Build with load(), from_operands(), from_arrays() or all_active()."""

    def __init__(self, weights: PredictorWeights, qtype: str = DEFAULT_QTYPE, n_batch: int = 512):
        if qtype not in PREDICTOR_QTYPES:
            raise PredictorError(f"predictor weight type '{qtype}' is not one of {', '.join(PREDICTOR_QTYPES)}")
        weights.validate("predictor")
        self.qtype = qtype
        self.n_layer, self.n_embd, self.n_ff = weights.n_layer, weights.n_embd, weights.n_ff
        q = PREDICTOR_QTYPES[qtype]
        self._setup([_Layer(operand(w1, q), operand(w2, q), t)
                     for w1, w2, t in zip(weights.fc1, weights.fc2, weights.thresholds)], n_batch)

    def _setup(self, layers: list[_Layer], n_batch: int) -> None:
        self.layers = layers
        self._alloc(max(n_batch, 1))
        self._idx = np.empty(self.n_ff, np.int32)

    def _alloc(self, n: int) -> None:
        self._h = np.empty(n * max(self.ranks), np.float32)  # relu(fc1 @ x) per token, [T, rank] views
        self._logits = np.empty((n, self.n_ff), np.float32)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, expected: Fingerprint | None = None, qtype: str = DEFAULT_QTYPE,
             n_batch: int = 512) -> "PredictorSet":
        """Our directory or a PowerInfer folder, refused (PredictorError) when made for another model."""
        return cls(load(path, expected), qtype, n_batch)

    @classmethod
    def from_operands(cls, fc1: list[tuple], fc2: list[tuple], thresholds: list[float], n_embd: int,
                      n_batch: int = 512) -> "PredictorSet":
        """From kernel operands used as they are (a sparse GGUF's predictor tensors, mapped): per layer
        (qtype, blocks) of fc1 [r, n_embd] and fc2 [n_ff, r], shapes checked by the caller."""
        self = cls.__new__(cls)
        self.qtype = fc2[0][0].name.lower()
        self.n_layer, self.n_embd, self.n_ff = len(fc1), n_embd, fc2[0][1].shape[0]
        self._setup([_Layer(w1, w2, t) for w1, w2, t in zip(fc1, fc2, thresholds)], n_batch)
        return self

    @classmethod
    def from_arrays(cls, fc1: list[np.ndarray], fc2: list[np.ndarray], thresholds: list[float],
                    fingerprint: Fingerprint | None = None, **kw) -> "PredictorSet":
        """From per-layer arrays fc1 [r, n_embd], fc2 [n_ff, r] (any float dtype; held as F16)."""
        w = PredictorWeights([np.asarray(a, np.float16) for a in fc1], [np.asarray(a, np.float16) for a in fc2],
                             [float(t) for t in thresholds], fingerprint)
        return cls(w, **kw)

    @classmethod
    def all_active(cls, n_layer: int, n_embd: int, n_ff: int, fingerprint: Fingerprint | None = None,
                   **kw) -> "PredictorSet":
        """Marks every neuron active (zero weights give logit 0, threshold 0): dense results, for tests."""
        zeros1, zeros2 = np.zeros((1, n_embd), np.float16), np.zeros((n_ff, 1), np.float16)
        return cls.from_arrays([zeros1] * n_layer, [zeros2] * n_layer, [0.0] * n_layer, fingerprint, **kw)

    # ---- facts -----------------------------------------------------------------------------------

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    @property
    def thresholds(self) -> list[float]:
        return [float(layer.threshold) for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Weight bytes read per token over all layers."""
        return sum(layer.nbytes for layer in self.layers)

    # ---- inference -------------------------------------------------------------------------------

    def logits(self, layer: int, resid: np.ndarray) -> np.ndarray:
        """Logits [T, n_ff] of resid f32 [T, n_embd]: a view of scratch, valid until the next call."""
        T = resid.shape[0]
        if T > self._logits.shape[0]:
            self._alloc(T)
        L = self.layers[layer]
        h, logits = self._h[:T * L.rank].reshape(T, L.rank), self._logits[:T]
        if T == 1:
            kernels.matvec(*L.fc1, resid[0], h[0])
            np.maximum(h, 0.0, out=h)
            kernels.matvec(*L.fc2, h[0], logits[0])
        else:
            kernels.matmul(*L.fc1, resid, h)
            np.maximum(h, 0.0, out=h)
            kernels.matmul(*L.fc2, h, logits)
        return logits

    def predict_mask(self, layer: int, resid: np.ndarray, out: np.ndarray) -> None:
        """out bool [T, n_ff] <- predicted active set of each token of resid f32 [T, n_embd]."""
        np.greater_equal(self.logits(layer, resid), self.layers[layer].threshold, out=out)

    def active_indices(self, layer: int, resid_vec: np.ndarray) -> np.ndarray:
        """Sorted int32 indices of the neurons predicted active for one token resid_vec f32 [n_embd]."""
        L = self.layers[layer]
        n = kernels.mlp_select(L.fc1, L.fc2, L.threshold, resid_vec, self._h[:L.rank], self._logits[0], self._idx)
        return self._idx[:n].copy()

"""TEAL-style input sparsity (--sparse input): per layer and matrix (q, k, v, the attention output,
gate, up, down), input entries x_j with |x_j| below the matrix's calibrated threshold are dropped.

Decoding one token reads only the kept columns, from a column-major copy of each matrix made at load
that holds the file's own numbers (kernels.columns: no second rounding); a batch (prefill,
perplexity) zeroes the dropped entries and runs the dense mat-mul, so that perplexity measures
decode's quality (the same products, summed in another order: float rounding apart).
"""

import contextlib

import numpy as np

from hybridinfer import kernels
from hybridinfer.ffn import DenseFFN, activate
from hybridinfer.loader import Block, Matrix, ModelArgs, round_input
from hybridinfer.predictors.thresholds import TEAL_MATRICES, Thresholds


class InputSparsity:
    """The thresholds and column copies of every layer's matrices; the model calls it as
    ``inputs(layer, name, matrix, x, out)`` in place of ``matrix(x, out)``. Counts, per layer and matrix,
    the inputs seen and kept (for --stats)."""

    def __init__(self, blocks: list[Block], thresholds: Thresholds, n_batch: int, decode: bool = True):
        self.t = [{name: np.float32(thresholds.input(i, name)) for name in TEAL_MATRICES} for i in range(len(blocks))]
        # the column-major copies decoding reads (none for a batch-only use such as calibration)
        self.cols = [{name: kernels.column_matrix(getattr(blk, name).qtype, getattr(blk, name).data)
                      for name in TEAL_MATRICES} for blk in blocks] if decode else None
        width = max(getattr(blocks[0], name).n_in for name in TEAL_MATRICES)
        self.masked = np.zeros(n_batch * width, np.float32)  # a batch's masked input, any width
        self.seen = np.zeros((len(blocks), len(TEAL_MATRICES)), np.int64)
        self.kept = np.zeros((len(blocks), len(TEAL_MATRICES)), np.int64)
        self.counting = False  # count the inputs seen and kept, each matrix called on its own
        self.paused = False  # counting, but not now (warm-up): the same kernels, nothing counted

    @property
    def fused(self) -> bool:
        """Whether a decode step runs each block in one kernel call over the column copies (not while
        counting, which needs each matrix's input)."""
        return self.cols is not None and not self.counting

    def attention_columns(self, layer: int) -> tuple | None:
        """kernels.AttentionDecoder's columns for a layer: q, k, v, output and their thresholds."""
        if self.cols is None:
            return None
        names = TEAL_MATRICES[:4]
        return (*(self.cols[layer][n] for n in names), [self.t[layer][n] for n in names])

    def __call__(self, layer: int, name: str, matrix: Matrix, x: np.ndarray, out: np.ndarray) -> None:
        t = self.t[layer][name]
        keep = np.abs(x) >= t
        if self.counting and not self.paused:
            j = TEAL_MATRICES.index(name)
            self.seen[layer, j] += x.size
            self.kept[layer, j] += np.count_nonzero(keep)
        if len(x) == 1 and self.cols is not None:
            cols = self.cols[layer][name]
            kernels.input_sparse_matvec(cols, round_input(cols.qtype, x)[0], t, out[0])
            return
        masked = self.masked[:x.size].reshape(x.shape)
        np.multiply(x, keep, out=masked)
        matrix(masked, out)

    def sparsity(self) -> np.ndarray:
        """Per layer and matrix (TEAL_MATRICES' order), the share of inputs dropped while counting."""
        return 1.0 - self.kept / np.maximum(self.seen, 1)

    def as_dict(self) -> dict:
        """Per layer and overall, each matrix's share of inputs dropped (run --stats)."""
        s = self.sparsity()
        overall = 1.0 - self.kept.sum(axis=0) / np.maximum(self.seen.sum(axis=0), 1)
        return {"layers": [{"layer": i, **dict(zip(TEAL_MATRICES, map(float, row)))} for i, row in enumerate(s)],
                "overall": dict(zip(TEAL_MATRICES, map(float, overall)))}

    def markdown(self) -> str:
        d = self.as_dict()
        lines = ["| layer | " + " | ".join(TEAL_MATRICES) + " |", "|---:|" + "---:|" * len(TEAL_MATRICES)]
        for r in d["layers"] + [{"layer": "all", **d["overall"]}]:
            lines.append(f"| {r['layer']} | " + " | ".join(f"{r[n]:.4f}" for n in TEAL_MATRICES) + " |")
        return "\n".join(lines)


class InputSparseFFN(DenseFFN):
    """The FFN with its three matrices' inputs sparse (InputSparsity); with counting, the inputs'
    sparsity is counted outside warm-up."""

    def __init__(self, args: ModelArgs, n_batch: int, inputs: InputSparsity, counting: bool = False):
        super().__init__(args, n_batch)
        self.inputs = inputs
        inputs.counting = counting
        # a decode step's FFN in one kernel call per layer, over the column copies
        self.decoders = [kernels.InputSparseFFNDecoder(
            *(cols[name] for name in TEAL_MATRICES[4:]), [t[name] for name in TEAL_MATRICES[4:]], self.kind,
            self.act.threshold) for cols, t in zip(inputs.cols, inputs.t)] if inputs.cols is not None else None

    @contextlib.contextmanager
    def uncounted(self):
        """Calls within the block count nothing but run the kernels a counted run runs (warm-up's)."""
        paused, self.inputs.paused = self.inputs.paused, True
        with super().uncounted():
            yield
        self.inputs.paused = paused

    def __call__(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        if len(xn) == 1 and self.inputs.fused:
            self.decoders[layer](xn[0], out[0])
            return
        gate, up = self.gate[:len(xn)], self.up[:len(xn)]
        self.inputs(layer, "ffn_gate", blk.ffn_gate, xn, gate)
        self.inputs(layer, "ffn_up", blk.ffn_up, xn, up)
        activate(self.act, gate, up)
        self.inputs(layer, "ffn_down", blk.ffn_down, gate, out)

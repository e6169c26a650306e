"""FFN strategies: how a block computes down(act(gate(x)) * up(x)). The model calls one per layer as
``ffn(layer, blk, resid, xn, out)``: resid[T, n_embd] is the residual stream before ffn_norm (the
predictors' input), xn[T, n_embd] the ffn_norm output, out[T, n_embd] receives the FFN output.

Sparse strategies compute only some neurons when decoding (T == 1). For T > 1 (prefill, perplexity)
they compute every row but zero the neurons they would skip, so their quality is measured on every
token with the decode path's weights and sets (predicted mode's down sums run in another grouping:
float rounding apart).
"""

import contextlib
import time

import numpy as np

from hybridinfer import kernels
from hybridinfer.predictors import PredictorSet, SparsityStats
from hybridinfer.predictors.thresholds import Thresholds
from hybridinfer.errors import HybridInferError
from hybridinfer.loader import Block, FFNActivation, Matrix, ModelArgs, interleaved_rows, neuron_major, round_input
from hybridinfer.kernels.ops import DRELU, FATRELU, RELU, SILU, activation, ffn_activation, nonzero

ACT_KIND = {"silu": SILU, "relu": RELU, "fatrelu": FATRELU, "drelu": DRELU}


def activate(act: FFNActivation, gate: np.ndarray, up: np.ndarray) -> None:
    """gate[T, n_ff] <- act(gate) * up (relu(gate) * relu(up) for dReLU), in place."""
    ffn_activation(gate, up, ACT_KIND[act.kind], np.float32(act.threshold))


class ActiveSet:
    """The truly active set A of DESIGN.md: act(gate) != 0 for ReLU and FATReLU, gate > 0 and up > 0
    for dReLU, and with CETT thresholds (any activation) a != 0 and |a_i| >= tau_i for the activation
    a = act(gate) * up, tau the layer's per-neuron thresholds (predictors.thresholds)."""

    def __init__(self, act: FFNActivation, cett: Thresholds | None = None):
        self.act, self.cett = act, cett

    def check(self) -> "ActiveSet":
        """Self, refused where there is no set to speak of: an activation without exact zeros and no thresholds."""
        if self.cett is None and not self.act.sparse:
            raise HybridInferError(f"FFN activation {self.act} has no exact zeros to predict: give a ReLU model, "
                                   f"--ffn-act relu / fatrelu:T / drelu, or CETT --thresholds DIR "
                                   f"(hybridinfer calibrate --method cett)")
        return self

    @property
    def needs_up(self) -> bool:
        """Whether mask reads the up projection too."""
        return self.cett is not None or self.act.kind == "drelu"

    def mask(self, layer: int, gate: np.ndarray, up: np.ndarray | None, out: np.ndarray) -> None:
        """out bool [T, n_ff] <- the active set, from gate (and up where needs_up) f32 [T, n_ff], the
        projections before the activation."""
        if self.cett is not None:
            a = gate.copy()
            activate(self.act, a, up)
            out[:] = self.cett.keeps(layer, a)
        elif self.act.kind == "relu":
            np.greater(gate, 0.0, out=out)
        elif self.act.kind == "drelu":
            np.greater(gate, 0.0, out=out)
            out &= up > 0.0
        else:  # fatrelu keeps g >= threshold, so g == 0 there is inactive too
            np.greater_equal(gate, np.float32(self.act.threshold), out=out)
            out &= gate != 0.0

    def of(self, layer: int, blk: Block, xn: np.ndarray, gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
        """out <- the active set of the FFN input xn [T, n_embd], the projections computed into gate
        (and up where needs_up)."""
        blk.ffn_gate(xn, gate)
        if self.needs_up:
            blk.ffn_up(xn, up)
        self.mask(layer, gate, up, out)


class DenseFFN:
    """Every neuron of every layer: the reference the sparse strategies are measured against."""

    stats: SparsityStats | None = None  # the sparse strategies' record of active neurons, if asked for

    def __init__(self, args: ModelArgs, n_batch: int):
        self.act = args.ffn_act
        self.kind = ACT_KIND[self.act.kind]
        self.gate = np.zeros((n_batch, args.n_ff), np.float32)
        self.up = np.zeros((n_batch, args.n_ff), np.float32)

    def __call__(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        gate, up = self.gate[:len(xn)], self.up[:len(xn)]
        blk.ffn_gate(xn, gate)
        blk.ffn_up(xn, up)
        activate(self.act, gate, up)
        blk.ffn_down(gate, out)

    @contextlib.contextmanager
    def uncounted(self):
        """Calls within the block leave stats as they were (Transformer.warm_up's)."""
        stats, self.stats = self.stats, None
        try:
            yield
        finally:
            self.stats = stats


class ExactSparseFFN(DenseFFN):
    """The gate for every neuron; up only where act(gate) != 0. Down reads the activation vector with
    its zeros, so the result is dense mode's bit for bit, with no predictor and no quality loss.

    With CETT thresholds the active set needs every neuron's gate and up (a_i = act(gate_i) * up_i):
    both run dense, the neurons under their thresholds are zeroed, and down reads the vector as
    above (the quality of the thresholded set, at dense mode's cost: predicted mode is the fast one)."""

    def __init__(self, args: ModelArgs, n_batch: int, active: ActiveSet, stats: SparsityStats | None = None):
        super().__init__(args, n_batch)
        self.active, self.stats = active, stats
        self.idx = np.zeros(args.n_ff, np.int32)

    def __call__(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        if self.active.cett is not None:
            self._thresholded(layer, blk, xn, out)
        elif len(xn) > 1:
            super().__call__(layer, blk, resid, xn, out)
            if self.stats:
                active = self.gate[:len(xn)] != 0
                self.stats.add(layer, active, active)
        else:
            self._decode(layer, blk, xn, out)

    def _decode(self, layer: int, blk: Block, xn: np.ndarray, out: np.ndarray) -> None:
        g, u = self.gate[0], self.up[0]
        blk.ffn_gate(xn, self.gate[:1])
        activation(g, self.kind, np.float32(self.act.threshold))
        n = nonzero(g, self.idx)
        idx = self.idx[:n]
        blk.ffn_up.gather(idx, xn, u[:n])
        if self.kind == DRELU:
            np.maximum(u[:n], 0.0, out=u[:n])
        if self.stats:
            active = np.zeros((1, len(g)), bool)
            active[0, idx] = u[:n] != 0 if self.kind == DRELU else True
            self.stats.add(layer, active, active)
        g[idx] *= u[:n]
        blk.ffn_down(self.gate[:1], out)

    def _thresholded(self, layer: int, blk: Block, xn: np.ndarray, out: np.ndarray) -> None:
        T = len(xn)
        gate, up = self.gate[:T], self.up[:T]
        blk.ffn_gate(xn, gate)
        blk.ffn_up(xn, up)
        activate(self.act, gate, up)
        keep = self.active.cett.keeps(layer, gate)
        if self.stats:
            self.stats.add(layer, keep, keep)
        gate[~keep] = 0.0
        blk.ffn_down(gate, out)


class PredictedFFN(DenseFFN):
    """The predictor picks the neurons; gate and up over those rows only, down over the neurons whose
    activation is non-zero. Decoding reads gate and up rows interleaved (one gather reads each neuron's
    two rows in one piece) and ffn_down neuron-major: copies made at load, or a converted file's own
    tensors; a decode step is two kernel calls, the predictor's and the FFN's over its set."""

    def __init__(self, args: ModelArgs, n_batch: int, blocks: list[Block], predictor: PredictorSet,
                 stats: SparsityStats | None = None, active: ActiveSet | None = None):
        super().__init__(args, n_batch)
        self.predictor, self.stats = predictor, stats
        self.active = active or ActiveSet(args.ffn_act)  # what --stats measures the predicted sets against
        self.predictor_s = 0.0  # time in the predictor, measured with --stats only
        # the file's own copies where it holds them (a converted file), else made here
        self.gate_up: list[Matrix] = [blk.ffn_gate_up if blk.ffn_gate_up is not None else
                                      interleaved_rows(blk.ffn_gate, blk.ffn_up) for blk in blocks]
        self.down_t: list[Matrix] = [blk.ffn_down_t if blk.ffn_down_t is not None else neuron_major(blk.ffn_down)
                                     for blk in blocks]  # [n_ff, n_embd] each
        self.both = np.zeros((n_batch, 2 * args.n_ff), np.float32)  # gate and up of a batch, interleaved
        self.mask = np.zeros((n_batch, args.n_ff), bool)
        self.idx = np.zeros(args.n_ff, np.int32)
        self.decoded = [0, 0]  # neurons computed, neurons there were: over all decode steps and layers

    @contextlib.contextmanager
    def uncounted(self):
        decoded = list(self.decoded)
        with super().uncounted():
            yield
        self.decoded[:] = decoded

    @property
    def active_share(self) -> float | None:
        """The share of FFN neurons the predictor picked over all decode steps so far (None before any)."""
        return self.decoded[0] / self.decoded[1] if self.decoded[1] else None

    def _predict_timed(self, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.predictor_s += time.perf_counter() - start
        return result

    def __call__(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        if len(xn) > 1:
            self._masked_dense(layer, blk, resid, xn, out)
            return
        predict = self.predictor.active_indices
        idx = self._predict_timed(predict, layer, resid[0]) if self.stats else predict(layer, resid[0])
        if self.stats:
            # the true set needs the dense gate (and up): this costs time, so --stats runs are not for speed
            self.active.of(layer, blk, xn, self.gate[:1], self.up[:1], self.mask[:1])
            predicted = np.zeros((1, len(self.idx)), bool)
            predicted[0, idx] = True
            self.stats.add(layer, self.mask[:1], predicted)
        self.decoded[0] += len(idx)
        self.decoded[1] += len(self.idx)
        self._decode(layer, idx, round_input(self.gate_up[layer].qtype, xn)[0], out[0])

    def _decode(self, layer: int, idx: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[n_embd] = the FFN over neurons idx of x[n_embd], rounded as the gate_up copy takes it."""
        gate_up, down = self.gate_up[layer], self.down_t[layer]
        kernels.sparse_ffn((gate_up.qtype, gate_up.data), (down.qtype, down.data), self.kind, self.act.threshold,
                           idx, x, out)

    def _masked_dense(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        """T tokens: every row computed, the unpredicted neurons zeroed, down over each token's active
        neurons through decode's neuron-major rows, each read once for the batch."""
        T = len(xn)
        gate, up, mask = self.gate[:T], self.up[:T], self.mask[:T]
        if self.stats:
            self._predict_timed(self.predictor.predict_mask, layer, resid, mask)
        else:
            self.predictor.predict_mask(layer, resid, mask)
        both = self.both[:T]
        self.gate_up[layer](xn, both)  # the rows decode gathers, so that a converted file's dense ones stay unmade
        np.copyto(gate, both[:, 0::2])
        np.copyto(up, both[:, 1::2])
        if self.stats:
            active = np.empty_like(mask)
            self.active.mask(layer, gate, up, active)
            self.stats.add(layer, active, mask)
        gate[~mask] = 0.0
        activate(self.act, gate, up)
        down = self.down_t[layer]
        kernels.sparse_axpy_batch(down.qtype, down.data, np.ascontiguousarray(gate.T), out)


class CPUSide:
    """The fast side of HybridFFN on the CPU: each layer's hot neurons as one contiguous block of
    their own (gate/up rows interleaved, down neuron-major), computed where predicted, on the spot."""

    name = "cpu"

    def __init__(self, args: ModelArgs):
        self.blocks: list[tuple[Matrix, Matrix]] = []
        self.kind, self.threshold = 0, 0.0
        self.n_embd = args.n_embd
        self.part = np.zeros(0, np.float32)  # the hot neurons' share of the FFN output, once there are any

    @staticmethod
    def scratch_bytes(args: ModelArgs) -> int:
        return 4 * args.n_embd

    @staticmethod
    def layer_bytes(blocks: list[Block], args: ModelArgs, n_ctx: int) -> None:
        """None: attention stays where it is, the CPU being both sides (placement.place's layer_bytes)."""

    def attach(self, model, layers: int) -> None:
        """Nothing to attach: see layer_bytes."""

    def load(self, gate_up: Matrix, down: Matrix, act_kind: int, act_threshold: float) -> None:
        """Append the next layer's hot block."""
        self.blocks.append((gate_up, down))
        self.kind, self.threshold = act_kind, act_threshold
        if gate_up.n_out and not self.part.size:
            self.part = np.zeros(self.n_embd, np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes this side allocated: the hot blocks and its scratch."""
        return sum(g.data.nbytes + d.data.nbytes for g, d in self.blocks) + self.part.nbytes

    def start(self, layer: int, idx: np.ndarray, x: np.ndarray) -> None:
        """Begin the layer's hot part over block positions idx (ascending) for x[n_embd], rounded."""
        gate_up, down = self.blocks[layer]
        kernels.sparse_ffn((gate_up.qtype, gate_up.data), (down.qtype, down.data), self.kind, self.threshold,
                           idx, x, self.part)

    def finish(self, out: np.ndarray) -> None:
        """out += the hot part begun by start."""
        out += self.part


class HybridFFN(PredictedFFN):
    """Predicted mode with each layer's hot neurons (placement.Placement) on a fast side: per decode
    step the predictor's set splits in two, the fast side starts its hot part, the CPU computes the
    cold part meanwhile, and one add merges them. With no hot neuron this is predicted mode exactly;
    otherwise it differs from it only by the order of the float sums. Prefill and perplexity (T > 1)
    run as predicted mode."""

    def __init__(self, args: ModelArgs, n_batch: int, blocks: list[Block], predictor: PredictorSet,
                 placement, side, stats: SparsityStats | None = None, active: ActiveSet | None = None):
        super().__init__(args, n_batch, blocks, predictor, stats, active)
        self.placement, self.side = placement, side
        self.position = []  # per layer: int32 [n_ff], a neuron's place in the hot block, -1 when cold
        for layer, hot in enumerate(placement.hot):
            position = np.full(args.n_ff, -1, np.int32)
            position[hot] = np.arange(len(hot), dtype=np.int32)
            self.position.append(position)
            gate_up, down = self.gate_up[layer], self.down_t[layer]
            if np.array_equal(hot, np.arange(len(hot))):  # a converted file stored hottest first: its first rows
                hot_rows, hot_down = gate_up.data[:2 * len(hot)], down.data[:len(hot)]
            else:  # the interleaved pairs, hottest first
                hot_rows = gate_up.data[np.stack([2 * hot, 2 * hot + 1], axis=1).reshape(-1)]
                hot_down = down.data[hot]
            side.load(Matrix(gate_up.qtype, hot_rows, gate_up.n_in, 2 * len(hot)),
                      Matrix(down.qtype, hot_down, down.n_in, len(hot)), self.kind, self.act.threshold)

    def _decode(self, layer: int, idx: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        position = self.position[layer][idx]
        hot = np.sort(position[position >= 0])
        if len(hot):
            self.side.start(layer, hot, x)
        super()._decode(layer, idx[position < 0], x, out)
        if len(hot):
            self.side.finish(out)


SPARSE_MODES = ("off", "exact", "predicted", "input")  # input: inputs.InputSparsity (TEAL)


def make_ffn(mode: str, args: ModelArgs, blocks: list[Block], n_batch: int, predictor: PredictorSet | None = None,
             stats: SparsityStats | None = None, cett: Thresholds | None = None):
    """The FFN strategy for --sparse MODE (off, exact or predicted; CETT thresholds define the active set)."""
    if mode == "predicted":
        return PredictedFFN(args, n_batch, blocks, predictor, stats, ActiveSet(args.ffn_act, cett))
    if mode == "exact":
        return ExactSparseFFN(args, n_batch, ActiveSet(args.ffn_act, cett).check(), stats)
    return DenseFFN(args, n_batch)

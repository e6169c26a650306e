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
from hybridinfer.errors import HybridInferError
from hybridinfer.loader import Block, FFNActivation, Matrix, ModelArgs, interleaved_rows, neuron_major, round_input
from hybridinfer.kernels.ops import FATRELU, RELU, SILU, activation, ffn_activation, nonzero

ACT_KIND = {"silu": SILU, "relu": RELU, "fatrelu": FATRELU}


def activate(act: FFNActivation, gate: np.ndarray, up: np.ndarray) -> None:
    """gate[T, n_ff] <- act(gate) * up, in place."""
    ffn_activation(gate, up, ACT_KIND[act.kind], np.float32(act.threshold))


def active_mask(act: FFNActivation, gate: np.ndarray, out: np.ndarray) -> None:
    """out bool [T, n_ff] <- act(gate) != 0 for gate f32 [T, n_ff], the gate projection before activation:
    the truly active set A of DESIGN.md."""
    if act.kind == "relu":
        np.greater(gate, 0.0, out=out)
    elif act.kind == "fatrelu":  # keeps g >= threshold, so g == 0 there is inactive too
        np.greater_equal(gate, np.float32(act.threshold), out=out)
        out &= gate != 0.0
    else:
        raise HybridInferError(f"FFN activation {act} has no exact zeros to predict: give a ReLU model or "
                               f"--ffn-act relu / fatrelu:T")


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
    its zeros, so the result is dense mode's bit for bit, with no predictor and no quality loss."""

    def __init__(self, args: ModelArgs, n_batch: int, stats: SparsityStats | None = None):
        super().__init__(args, n_batch)
        self.stats = stats
        self.idx = np.zeros(args.n_ff, np.int32)

    def __call__(self, layer: int, blk: Block, resid: np.ndarray, xn: np.ndarray, out: np.ndarray) -> None:
        if len(xn) > 1:
            super().__call__(layer, blk, resid, xn, out)
            if self.stats:
                active = self.gate[:len(xn)] != 0
                self.stats.add(layer, active, active)
            return
        g, u = self.gate[0], self.up[0]
        blk.ffn_gate(xn, self.gate[:1])
        activation(g, self.kind, np.float32(self.act.threshold))
        if self.stats:
            active = (g != 0)[None, :]
            self.stats.add(layer, active, active)
        n = nonzero(g, self.idx)
        idx = self.idx[:n]
        blk.ffn_up.gather(idx, xn, u[:n])
        g[idx] *= u[:n]
        blk.ffn_down(self.gate[:1], out)


class PredictedFFN(DenseFFN):
    """The predictor picks the neurons; gate and up over those rows only, down over the neurons whose
    activation is non-zero. Decoding reads gate and up rows interleaved (one gather reads each neuron's
    two rows in one piece) and ffn_down neuron-major: copies made at load, or a converted file's own
    tensors; a decode step is two kernel calls, the predictor's and the FFN's over its set."""

    def __init__(self, args: ModelArgs, n_batch: int, blocks: list[Block], predictor: PredictorSet,
                 stats: SparsityStats | None = None):
        super().__init__(args, n_batch)
        self.predictor, self.stats = predictor, stats
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
            # the true set needs the dense gate: this costs time, so --stats runs are not for speed
            blk.ffn_gate(xn, self.gate[:1])
            active_mask(self.act, self.gate[:1], self.mask[:1])
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
            active_mask(self.act, gate, active)
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
                 placement, side, stats: SparsityStats | None = None):
        super().__init__(args, n_batch, blocks, predictor, stats)
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


SPARSE_MODES = ("off", "exact", "predicted")


def make_ffn(mode: str, args: ModelArgs, blocks: list[Block], n_batch: int, predictor: PredictorSet | None = None,
             stats: SparsityStats | None = None):
    """The FFN strategy for --sparse MODE (off, exact or predicted)."""
    if mode == "predicted":
        return PredictedFFN(args, n_batch, blocks, predictor, stats)
    if mode == "exact":
        return ExactSparseFFN(args, n_batch, stats)
    return DenseFFN(args, n_batch)

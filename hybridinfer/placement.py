"""Placement: which FFN neurons live on the fast side under a byte budget (the hot/cold split).

The fast side first takes what every decode step needs there whatever the neurons (its scratch
buffers), then the hottest neurons: a neuron's gate row, up row and down column together, in groups
of GROUP neurons of one layer, taken across all layers in order of expected activations per byte
(activation counts from a profile, `hybridinfer profile`). Within a layer the groups go hottest
first, so each layer's fast neurons are a prefix of its neurons sorted by activation count: the hot
block. A group that no longer fits closes its layer; smaller groups of other layers may still fit.
The budget is an upper bound on the bytes the fast side allocates, never exceeded.

Attention, norms, predictors and the KV cache stay on the CPU in this engine for now, so the whole
budget beyond the scratch goes to neurons.
"""

from dataclasses import dataclass

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.loader import Block, interleaved_type, neuron_major_type, row_bytes
from hybridinfer.predictors.activity import ActivationStats

GROUP = 256  # neurons per unit of placement, as PowerInfer's 256-row chunks


@dataclass
class Placement:
    hot: list[np.ndarray]  # per layer: int32 neuron ids on the fast side, hottest first
    n_ff: list[int]  # per layer: all neurons
    neuron_bytes: list[int]  # per layer: bytes of one neuron's gate row + up row + down column
    scratch_bytes: int  # the fast side's buffers (0 when it holds no neuron)
    budget: int  # bytes the fast side may allocate
    share: float  # expected share of all activations that the fast side's neurons serve

    @property
    def hot_bytes(self) -> int:
        return sum(len(h) * b for h, b in zip(self.hot, self.neuron_bytes))

    @property
    def nbytes(self) -> int:
        """Bytes the fast side allocates: hot neurons and scratch."""
        return self.hot_bytes + self.scratch_bytes

    @property
    def cold_bytes(self) -> int:
        """Bytes of FFN neurons left on the CPU side."""
        return sum((n - len(h)) * b for h, b, n in zip(self.hot, self.neuron_bytes, self.n_ff))

    def describe(self, device: str) -> str:
        """One line: bytes on each side and the expected share of activations served by the fast side."""
        mib = 2.0 ** 20
        n_hot, n_all = sum(len(h) for h in self.hot), sum(self.n_ff)
        return (f"placement: {device} side {self.nbytes / mib:.1f} MiB of a {self.budget / mib:.1f} MiB budget "
                f"({n_hot} of {n_all} FFN neurons, {self.hot_bytes / mib:.1f} MiB, + {self.scratch_bytes / mib:.2f} "
                f"MiB scratch), CPU side {self.cold_bytes / mib:.1f} MiB of FFN neurons; expected share of "
                f"activations on the {device} side {100 * self.share:.1f}%")


def neuron_bytes(blk: Block) -> int:
    """Bytes of one neuron of the block as the split copies it: its gate and up rows in the
    interleaved copy's type and its down column in the neuron-major copy's type."""
    return 2 * row_bytes(interleaved_type(blk.ffn_gate), blk.ffn_gate.n_in) + \
        row_bytes(neuron_major_type(blk.ffn_down), blk.ffn_down.n_out)


def place(stats: ActivationStats, neuron_bytes: list[int], budget: int, scratch_bytes: int,
          group: int = GROUP) -> Placement:
    """The placement of stats' neurons under budget bytes (see the module's docstring)."""
    if budget < 0:
        raise HybridInferError(f"the fast-side budget must not be negative, got {budget} bytes")
    n_layer = stats.n_layer
    if len(neuron_bytes) != n_layer:
        raise HybridInferError(f"the profile has {n_layer} layers, the model {len(neuron_bytes)}")
    # hottest first in each layer; ties by neuron id, so the placement is reproducible
    order = [np.argsort(-c, kind="stable").astype(np.int32) for c in stats.counts]
    # every group of every layer: (activations per byte, layer, group index, bytes); within a layer the
    # densities never rise (counts sorted, the last group the coldest), so a stable sort keeps each
    # layer's groups in order and what a layer takes is a prefix
    groups = []
    for layer, (o, c, b) in enumerate(zip(order, stats.counts, neuron_bytes)):
        sums = np.add.reduceat(c[o], np.arange(0, len(o), group)).astype(np.float64)
        sizes = np.minimum(group, len(o) - np.arange(0, len(o), group))
        groups += [(s / (n * b), layer, g, int(n) * b) for g, (s, n) in enumerate(zip(sums, sizes))]
    groups.sort(key=lambda g: -g[0])
    taken = [0] * n_layer  # groups taken per layer
    closed = [False] * n_layer
    left = budget - scratch_bytes
    for _, layer, _, nbytes in groups:
        if closed[layer] or left <= 0:
            continue
        if nbytes > left:
            closed[layer] = True
            continue
        taken[layer] += 1
        left -= nbytes
    hot = [o[:min(t * group, len(o))] for o, t in zip(order, taken)]
    total = sum(int(c.sum()) for c in stats.counts)
    served = sum(int(c[h].sum()) for c, h in zip(stats.counts, hot))
    return Placement(hot, [len(c) for c in stats.counts], list(neuron_bytes),
                     scratch_bytes if any(len(h) for h in hot) else 0, budget, served / total if total else 0.0)

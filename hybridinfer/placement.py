"""Placement: what lives on the fast side under a byte budget (the hot/cold split).

The fast side first takes what every token needs whatever the neurons, layer by layer from the first
(a layer's attention weights, norm and KV cache at the context size, with their scratch), then the
hottest FFN neurons: a neuron's gate row, up row and down column together, in groups of GROUP neurons
of one layer, taken across all layers in order of expected activations per byte (activation counts
from a profile, `hybridinfer profile`), the first of them paying for the neurons' scratch buffers.
Within a layer the groups go hottest first, so each layer's fast neurons are a prefix of its neurons
sorted by activation count: the hot block. A group that no longer fits closes its layer; smaller
groups of other layers may still fit. The budget is an upper bound on the bytes the fast side
allocates, never exceeded.

With whole_layers, the budget goes to whole layers instead (each layer's parts and all its neurons,
from the first): llama.cpp's way to offload (n_gpu_layers), the baseline the split is measured against.
"""

import time
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
    layers: int  # the first layers whose attention (and KV cache) lives on the fast side
    layer_bytes: int  # their bytes
    scratch_bytes: int  # the neurons' buffers on the fast side (0 when it holds no neuron)
    budget: int  # bytes the fast side may allocate
    share: float  # expected share of all activations that the fast side's neurons serve
    seconds: float  # the time place() took

    @property
    def hot_bytes(self) -> int:
        return sum(len(h) * b for h, b in zip(self.hot, self.neuron_bytes))

    @property
    def nbytes(self) -> int:
        """Bytes the fast side allocates: layers' attention, hot neurons and scratch."""
        return self.layer_bytes + self.hot_bytes + self.scratch_bytes

    @property
    def cold_bytes(self) -> int:
        """Bytes of FFN neurons left on the CPU side."""
        return sum((n - len(h)) * b for h, b, n in zip(self.hot, self.neuron_bytes, self.n_ff))

    def describe(self, device: str) -> str:
        """One line: bytes on each side and the expected share of activations served by the fast side."""
        mib = 2.0 ** 20
        n_hot, n_all = sum(len(h) for h in self.hot), sum(self.n_ff)
        return (f"placement: {device} side {self.nbytes / mib:.1f} MiB of a {self.budget / mib:.1f} MiB budget "
                f"(attention of {self.layers} of {len(self.n_ff)} layers, {self.layer_bytes / mib:.1f} MiB; "
                f"{n_hot} of {n_all} FFN neurons, {self.hot_bytes / mib:.1f} MiB; "
                f"{self.scratch_bytes / mib:.2f} MiB scratch), CPU side {self.cold_bytes / mib:.1f} MiB of FFN "
                f"neurons; expected share of activations on the {device} side {100 * self.share:.1f}%; placed in "
                f"{1e3 * self.seconds:.0f} ms")


def neuron_bytes(blk: Block) -> int:
    """Bytes of one neuron of the block as the split copies it: its gate and up rows in the
    interleaved copy's type and its down column in the neuron-major copy's type."""
    return 2 * row_bytes(interleaved_type(blk.ffn_gate, blk.ffn_up), blk.ffn_gate.n_in) + \
        row_bytes(neuron_major_type(blk.ffn_down), blk.ffn_down.n_out)


def place(stats: ActivationStats, neuron_bytes: list[int], budget: int, scratch_bytes: int,
          layer_bytes: list[int | None] | None = None, group: int = GROUP, whole_layers: bool = False) -> Placement:
    """The placement of stats' neurons under budget bytes (see the module's docstring). layer_bytes:
    per layer, the bytes of its attention on the fast side, None where it cannot go there; None
    altogether for a side that leaves attention on the CPU."""
    start = time.perf_counter()
    if budget < 0:
        raise HybridInferError(f"the fast-side budget must not be negative, got {budget} bytes")
    n_layer, n_ff = stats.n_layer, [len(c) for c in stats.counts]
    if len(neuron_bytes) != n_layer:
        raise HybridInferError(f"the profile has {n_layer} layers, the model {len(neuron_bytes)}")
    # hottest first in each layer; ties by neuron id, so the placement is reproducible
    order = [np.argsort(-c, kind="stable").astype(np.int32) for c in stats.counts]
    left, layers, attention = budget, 0, 0
    taken = [0] * n_layer  # neurons taken per layer
    if layer_bytes is not None or whole_layers:  # layer by layer from the first
        for i in range(n_layer):
            size = layer_bytes[i] if layer_bytes is not None else 0
            neurons = n_ff[i] if whole_layers else 0
            cost = (size or 0) + neurons * neuron_bytes[i] + (scratch_bytes if neurons and not any(taken) else 0)
            if size is None or cost > left:
                break
            left -= cost
            attention += size
            layers += layer_bytes is not None
            taken[i] = neurons
    if not whole_layers:
        _hottest_groups(stats, order, neuron_bytes, left, scratch_bytes, group, taken)
    hot = [o[:t] for o, t in zip(order, taken)]
    total = sum(int(c.sum()) for c in stats.counts)
    served = sum(int(c[h].sum()) for c, h in zip(stats.counts, hot))
    return Placement(hot, n_ff, list(neuron_bytes), layers, attention, scratch_bytes if any(taken) else 0, budget,
                     served / total if total else 0.0, time.perf_counter() - start)


def _hottest_groups(stats, order, neuron_bytes, left, scratch_bytes, group, taken) -> None:
    """taken[layer] += the neurons of the groups that fit in left bytes, densest first."""
    # every group of every layer: (activations per byte, layer, bytes, neurons); within a layer the
    # densities never rise (counts sorted, the last group the coldest), so a stable sort keeps each
    # layer's groups in order and what a layer takes is a prefix
    groups = []
    for layer, (o, c, b) in enumerate(zip(order, stats.counts, neuron_bytes)):
        starts = np.arange(0, len(o), group)
        sums = np.add.reduceat(c[o], starts).astype(np.float64) if len(o) else np.zeros(0)
        sizes = np.minimum(group, len(o) - starts)
        groups += [(s / (n * b), layer, int(n) * b, int(n)) for s, n in zip(sums, sizes)]
    groups.sort(key=lambda g: -g[0])
    closed = set()
    for _, layer, nbytes, n in groups:
        cost = nbytes + (0 if any(taken) else scratch_bytes)  # the first group brings the scratch
        if layer in closed:
            continue
        if cost > left:
            closed.add(layer)
            continue
        taken[layer] += n
        left -= cost

"""Calibrating sparsity thresholds on text (predictors.thresholds holds the format and the definitions).

CETT: one dense pass records each layer's activations a = act(gate) * up on a sample of the
calibration tokens. Per layer, a grid of contribution thresholds eps (the quantiles of
|a_i| * ||down[:, i]|| at sparsities 0 .. 0.99) gives, for each, the FFN sparsity and the CETT (the
mean over tokens of ||down @ (a restricted to the dropped neurons)|| / ||down @ a||); a CETT target
then sets each layer's eps by interpolation. --sparsity S searches the CETT target whose mean sparsity
over layers is S; --ppl-increase P searches (bisection) the largest target whose perplexity on the
calibration chunks, with the thresholded sets zeroed as --sparse exact computes them, stays within P%
of the dense model's.
"""

import math
from dataclasses import dataclass

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import ActiveSet, DenseFFN, ExactSparseFFN
from hybridinfer.inputs import InputSparseFFN, InputSparsity
from hybridinfer.loader import Matrix
from hybridinfer.model import Transformer
from hybridinfer.perplexity import chunk_nll
from hybridinfer.predictors.collect import Plan, progress_bar
from hybridinfer.predictors.format import Fingerprint
from hybridinfer.predictors.stats import SparsityStats
from hybridinfer.predictors.thresholds import TEAL_MATRICES, Thresholds

GRID = np.concatenate([np.linspace(0.0, 0.9, 46), np.linspace(0.91, 0.99, 9)])  # sparsities of the eps grid
CURVE_ROWS = 512  # tokens per layer the CETT curves are measured on
SEARCH_STEPS = 12  # bisection steps of the perplexity search
NEVER = np.finfo(np.float32).max  # the threshold of a neuron whose down column is zero: never active


def _sampled(first: int, T: int, stride: int, room: int) -> np.ndarray:
    """The rows of a step of T tokens, the first being token number first, that fall on every stride-th
    token, at most room of them."""
    return (np.arange(first, first + T) % stride == 0).nonzero()[0][:room]


class _Recorder(DenseFFN):
    """Dense FFN that keeps each layer's activations a [T, n_ff] of every stride-th token."""

    def __init__(self, model: Transformer, rows: int, stride: int):
        super().__init__(model.args, model.n_batch)
        self.stride, self.seen = stride, 0
        self.acts = [np.zeros((rows, model.args.n_ff), np.float32) for _ in range(model.args.n_layer)]
        self.n = [0] * model.args.n_layer

    def __call__(self, layer, blk, resid, xn, out) -> None:
        super().__call__(layer, blk, resid, xn, out)
        T = len(xn)
        take = _sampled(self.seen, T, self.stride, len(self.acts[layer]) - self.n[layer])
        self.acts[layer][self.n[layer]:self.n[layer] + len(take)] = self.gate[take]
        self.n[layer] += len(take)
        if layer == len(self.acts) - 1:
            self.seen += T


def mean_nll(model: Transformer, plan: Plan, progress=None) -> float:
    """Mean negative log-likelihood over the second halves of the plan's chunks (perplexity's scoring)."""
    total, count = 0.0, 0
    for c in plan.chunks:
        chunk = np.array(plan.tokens(c))
        nll = chunk_nll(model, chunk)
        if not np.isfinite(nll).all():
            raise HybridInferError("the model produced non-finite logits on the calibration text: its weights are "
                                   "damaged")
        total += nll.sum()
        count += len(nll)
        if progress:
            progress.update(len(chunk))
    return total / max(count, 1)


def record_activations(model: Transformer, plan: Plan, progress: bool) -> tuple[list[np.ndarray], float]:
    """Each layer's activations on up to CURVE_ROWS tokens spread over the plan, and the dense model's
    mean NLL on it (the same pass)."""
    rows = min(CURVE_ROWS, plan.n_tokens)
    recorder = _Recorder(model, rows, max(1, plan.n_tokens // rows))
    inner, model.ffn = model.ffn, recorder
    try:
        with progress_bar(total=plan.n_tokens, unit="tok", desc="dense pass", disable=not progress) as bar:
            nll = mean_nll(model, plan, bar)
    finally:
        model.ffn = inner
    return [a[:n] for a, n in zip(recorder.acts, recorder.n)], nll


@dataclass
class Curve:
    """One layer's grid: contribution thresholds eps, the sparsity and CETT each gives on the sample."""
    eps: np.ndarray
    sparsity: np.ndarray
    cett: np.ndarray

    def eps_for(self, cett: float) -> float:
        """The largest eps whose CETT stays at or below the target (interpolated)."""
        return float(np.interp(cett, self.cett, self.eps))

    def sparsity_for(self, cett: float) -> float:
        return float(np.interp(cett, self.cett, self.sparsity))


def down_norms(down: np.ndarray) -> np.ndarray:
    """||down[:, i]|| f32 [n_ff] of a down projection down [n_embd, n_ff]: each neuron's contribution per unit
    of activation."""
    return np.sqrt((down.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)


def cett_curve(a: np.ndarray, down: np.ndarray, norms: np.ndarray) -> Curve:
    """The grid of one layer from its activations a [M, n_ff], its down projection down [n_embd, n_ff] and
    down_norms(down)."""
    contrib = np.abs(a) * norms
    full = np.linalg.norm(a @ down.T, axis=1)
    full[full == 0] = 1.0
    eps = np.quantile(contrib, GRID).astype(np.float32)
    eps[0] = 0.0
    sparsity, cett = np.zeros(len(GRID)), np.zeros(len(GRID))
    for k, e in enumerate(eps):
        drop = contrib < e
        sparsity[k] = drop.mean()
        cett[k] = (np.linalg.norm(np.where(drop, a, 0.0) @ down.T, axis=1) / full).mean()
    cett = np.maximum.accumulate(cett)  # monotone for interpolation (the sum of dropped vectors nearly is)
    return Curve(eps, sparsity, cett)


def cett_thresholds(curves: list[Curve], down_norms: list[np.ndarray], target: float, fp: Fingerprint,
                    info: dict) -> Thresholds:
    """Per-neuron thresholds tau = eps / ||down[:, i]|| for a CETT target."""
    layers = []
    for curve, norms in zip(curves, down_norms):
        eps = curve.eps_for(target)
        with np.errstate(divide="ignore"):
            tau = np.where(norms > 0, np.float32(eps) / np.maximum(norms, 1e-30), NEVER).astype(np.float32)
        layers.append({"ffn_act": np.minimum(tau, NEVER)})
    return Thresholds("cett", fp, layers, info)


def exact_nll(model: Transformer, plan: Plan, th: Thresholds, stats: SparsityStats | None = None) -> float:
    """Mean NLL on the plan with the thresholded sets zeroed (--sparse exact's arithmetic)."""
    inner = model.ffn
    model.ffn = ExactSparseFFN(model.args, model.n_batch, ActiveSet(model.args.ffn_act, th), stats)
    try:
        return mean_nll(model, plan)
    finally:
        model.ffn = inner


def calibrate_cett(model: Transformer, plan: Plan, fp: Fingerprint, ppl_increase: float | None,
                   sparsity: float | None, progress: bool = True) -> tuple[Thresholds, dict]:
    """CETT thresholds for a perplexity budget (percent) or a mean FFN sparsity; returns them and a summary."""
    acts, base = record_activations(model, plan, progress)
    downs = [blk.ffn_down.values() for blk in model.w.blk]
    norms = [down_norms(d) for d in downs]
    curves = [cett_curve(a, d, n) for a, d, n in
              zip(progress_bar(acts, desc="CETT curves", unit="layer", disable=not progress), downs, norms)]
    top = float(min(c.cett[-1] for c in curves))

    def mean_sparsity(target):
        return float(np.mean([c.sparsity_for(target) for c in curves]))

    lo, hi = 0.0, top
    if sparsity is not None:
        if mean_sparsity(top) < sparsity:
            raise HybridInferError(f"--sparsity {sparsity:g} is beyond the calibration grid (at most "
                                   f"{mean_sparsity(top):.3f} here): ask for less")
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_sparsity(mid) < sparsity else (lo, mid)
        target, nll = hi, None
    else:
        budget = base + math.log1p(ppl_increase / 100)
        nll = base
        with progress_bar(total=SEARCH_STEPS, desc="perplexity search", unit="step", disable=not progress) as bar:
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi) / 2
                got = exact_nll(model, plan, cett_thresholds(curves, norms, mid, fp, {}))
                if got <= budget:
                    lo, nll = mid, got
                else:
                    hi = mid
                bar.update()
        target = lo
    th = cett_thresholds(curves, norms, target, fp, {})
    stats = SparsityStats(model.args.n_layer, model.args.n_ff)
    nll = exact_nll(model, plan, th, stats)  # the sparsity reached on every calibration token
    table = [{"layer": i, "eps": c.eps_for(target), "sparsity": row["true_sparsity"]}
             for i, (c, row) in enumerate(zip(curves, stats.layers()))]
    summary = {"method": "cett", "cett_target": target, "sparsity": stats.overall()["true_sparsity"],
               "calibration_ppl_dense": math.exp(base), "calibration_ppl": math.exp(nll),
               "calibration_tokens": plan.n_tokens, "curve_tokens": len(acts[0]), "layers": table}
    th.info = summary
    return th, summary


# ---- TEAL --------------------------------------------------------------------------------------

SHARED_INPUT = {"attn_q": "attn_q", "attn_k": "attn_q", "attn_v": "attn_q", "attn_output": "attn_output",
                "ffn_gate": "ffn_gate", "ffn_up": "ffn_gate", "ffn_down": "ffn_down"}  # matrices reading one input


def teal_thresholds(samples: list[dict[str, np.ndarray]], sparsity: float, fp: Fingerprint) -> Thresholds:
    """Per matrix, the magnitude below which the given share of its recorded inputs lies (uniform
    sparsity: every matrix drops the same share)."""
    layers = []
    for rec in samples:
        t = {name: np.float32(np.quantile(rec[name], sparsity)) if sparsity > 0 else np.float32(0.0)
             for name in set(SHARED_INPUT.values())}
        layers.append({name: np.array([t[SHARED_INPUT[name]]], np.float32) for name in TEAL_MATRICES})
    return Thresholds("teal", fp, layers, {})


class _InputRecorder(InputSparsity):
    """Thresholds of zero (the dense model), keeping |x| (f16) of every stride-th token of each input."""

    def __init__(self, model: Transformer, fp: Fingerprint, rows: int, stride: int):
        super().__init__(model.w.blk, teal_thresholds([{}] * model.args.n_layer, 0.0, fp), model.n_batch,
                         decode=False)
        self.stride, self.rows = stride, rows
        self.samples = [{} for _ in model.w.blk]
        self.n = [dict.fromkeys(SHARED_INPUT.values(), 0) for _ in model.w.blk]
        self.first = 0  # the token index of the current step's first row

    def __call__(self, layer: int, name: str, matrix: Matrix, x: np.ndarray, out: np.ndarray) -> None:
        matrix(x, out)
        if SHARED_INPUT[name] != name:
            return
        rec, n = self.samples[layer], self.n[layer]
        if name not in rec:
            rec[name] = np.zeros((self.rows, x.shape[1]), np.float16)
        take = _sampled(self.first, len(x), self.stride, self.rows - n[name])
        rec[name][n[name]:n[name] + len(take)] = np.abs(x[take])
        n[name] += len(take)
        if layer == len(self.samples) - 1 and name == "ffn_down":
            self.first += len(x)


def inputs_nll(model: Transformer, plan: Plan, inputs: InputSparsity, counting: bool = False) -> float:
    """Mean NLL on the plan with the inputs sparse as inputs says (batches: masked dense); with
    counting, inputs counts the inputs dropped."""
    ffn, model.ffn = model.ffn, InputSparseFFN(model.args, model.n_batch, inputs, counting)
    model.inputs = inputs
    try:
        return mean_nll(model, plan)
    finally:
        model.ffn, model.inputs = ffn, None


def calibrate_teal(model: Transformer, plan: Plan, fp: Fingerprint, ppl_increase: float | None,
                   sparsity: float | None, progress: bool = True) -> tuple[Thresholds, dict]:
    """TEAL thresholds, every matrix at one input sparsity: the given one, or the highest whose
    calibration perplexity stays within ppl_increase percent of dense (bisection)."""
    rows = min(CURVE_ROWS, plan.n_tokens)
    recorder = _InputRecorder(model, fp, rows, max(1, plan.n_tokens // rows))
    ffn, model.ffn, model.inputs = model.ffn, InputSparseFFN(model.args, model.n_batch, recorder), recorder
    try:
        with progress_bar(total=plan.n_tokens, unit="tok", desc="dense pass", disable=not progress) as bar:
            base = mean_nll(model, plan, bar)
    finally:
        model.ffn, model.inputs = ffn, None
    samples = [{k: v[:n[k]].astype(np.float32) for k, v in rec.items()} for rec, n in zip(recorder.samples, recorder.n)]

    def measure(level, counting=False):
        inputs = InputSparsity(model.w.blk, teal_thresholds(samples, level, fp), model.n_batch, decode=False)
        return inputs_nll(model, plan, inputs, counting), inputs

    if sparsity is None:
        lo, hi = 0.0, 0.99
        budget = base + math.log1p(ppl_increase / 100)
        with progress_bar(total=SEARCH_STEPS, desc="perplexity search", unit="step", disable=not progress) as bar:
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if measure(mid)[0] <= budget else (lo, mid)
                bar.update()
        sparsity = lo
    nll, inputs = measure(sparsity, counting=True)
    reached = inputs.sparsity()
    table = [{"layer": i, **{f"t {name}": float(inputs.t[i][name]) for name in ("attn_q", "attn_output", "ffn_gate",
                                                                                 "ffn_down")},
              "sparsity": float(reached[i].mean())} for i in range(len(reached))]
    th = teal_thresholds(samples, sparsity, fp)
    weights = np.array([[getattr(blk, name).n_in * getattr(blk, name).n_out for name in TEAL_MATRICES]
                        for blk in model.w.blk], np.float64)
    th.info = {"method": "teal", "target_sparsity": sparsity,
               "sparsity": float((reached * weights).sum() / weights.sum()),  # weighted by the matrices' sizes
               "calibration_ppl_dense": math.exp(base), "calibration_ppl": math.exp(nll),
               "calibration_tokens": plan.n_tokens, "sample_tokens": rows, "layers": table}
    return th, th.info

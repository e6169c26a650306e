"""Activation statistics on disk: how often each FFN neuron was truly active, per layer.

Ours is one safetensors file: ``blk.N.counts`` (int64 [n_ff], the tokens for which neuron i was
active) for every layer, and in its metadata the number of tokens profiled and the model's
fingerprint (as predictors carry). PowerInfer's are ``activation/activation_N.pt`` files, one
per-neuron count tensor per layer, read with torch.load(weights_only=True); they say neither the
token count nor the model, so only their sizes can be checked.

A neuron's activation frequency is counts / tokens. Activation frequency follows a power law: the
share of neurons that carries a given share of all activations (hottest first) says how much a fast
device holding only the hottest neurons can serve.

This module imports nothing from the engine.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridinfer.predictors.format import Fingerprint, PredictorError

FORMAT = "hybridinfer-activation-stats"
FORMAT_VERSION = 1
SHARES = (0.5, 0.8, 0.95)  # the shares of activations the table reports
_POWERINFER_FILE = re.compile(r"activation_(\d+)\.pt")


class StatsError(PredictorError):
    """Activation statistics that cannot be used: one line naming the file and the fix."""


@dataclass
class ActivationStats:
    counts: list[np.ndarray]  # per layer int64 [n_ff]: tokens for which each neuron was truly active
    tokens: int | None  # tokens profiled (every layer sees each); None for PowerInfer's files
    fingerprint: Fingerprint | None  # the model profiled; None for PowerInfer's files
    source: str = "hybridinfer"  # or "powerinfer"

    @property
    def n_layer(self) -> int:
        return len(self.counts)

    @property
    def n_ff(self) -> int:
        return len(self.counts[0])

    def hot_shares(self, layer: int, shares=SHARES) -> list[float]:
        """For each share s: the smallest share of the layer's neurons, hottest first, whose
        activations make up at least s of all the layer's activations (0 when none fired)."""
        cumulative = self.cumulative(layer)
        return [0.0 if cumulative[-1] == 0 else
                (int(np.searchsorted(cumulative, s * cumulative[-1] * (1 - 1e-12))) + 1) / self.n_ff
                for s in shares]

    def cumulative(self, layer: int) -> np.ndarray:
        """int64 [n_ff]: the activations of the k + 1 hottest neurons, for each k."""
        return np.cumsum(np.sort(self.counts[layer])[::-1])

    def rows(self) -> list[dict]:
        """One row per layer: tokens, mean true sparsity, and the neurons' share for each of SHARES."""
        out = []
        for i, c in enumerate(self.counts):
            sparsity = None if not self.tokens else 1.0 - c.sum() / (self.tokens * self.n_ff)
            out.append({"layer": i, "tokens": self.tokens, "true_sparsity": sparsity,
                        **{f"neurons_for_{round(100 * s)}pct": v for s, v in zip(SHARES, self.hot_shares(i))}})
        return out

    def markdown(self) -> str:
        head = ("| layer | tokens | true sparsity | " + " | ".join(f"neurons for {round(100 * s)}%" for s in SHARES)
                + " |\n| ---: | ---: | ---: |" + " ---: |" * len(SHARES))
        lines = [head]
        for r in self.rows():
            tokens = "?" if r["tokens"] is None else str(r["tokens"])
            sparsity = "?" if r["true_sparsity"] is None else f"{r['true_sparsity']:.3f}"
            shares = " | ".join(f"{100 * r[f'neurons_for_{round(100 * s)}pct']:.1f}%" for s in SHARES)
            lines.append(f"| {r['layer']} | {tokens} | {sparsity} | {shares} |")
        return "\n".join(lines)

    def validate(self, where: str, n_layer: int | None = None, n_ff: int | None = None) -> None:
        """Every layer present with one non-negative count per neuron, none above the token count."""
        if not self.counts:
            raise StatsError(f"{where} holds no layers: profile the model again")
        n_layer = self.n_layer if n_layer is None else n_layer
        n_ff = len(self.counts[0]) if n_ff is None else n_ff
        if self.n_layer != n_layer:
            raise StatsError(f"{where} has {self.n_layer} layers, the model has {n_layer}: profile this model")
        for i, c in enumerate(self.counts):
            if c.shape != (n_ff,):
                raise StatsError(f"{where}: layer {i} has counts of shape {list(c.shape)}, expected [{n_ff}]: "
                                 f"profile this model")
            if c.min(initial=0) < 0 or (self.tokens is not None and c.max(initial=0) > self.tokens):
                raise StatsError(f"{where}: layer {i} has counts outside [0, {self.tokens or 'inf'}]: "
                                 f"the file is damaged; profile the model again")

    def save(self, path: str | Path) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        if self.fingerprint is None or self.tokens is None:
            raise StatsError(f"{path}: cannot save statistics without the model's fingerprint and token count")
        self.validate(str(path))
        try:
            save_file({f"blk.{i}.counts": np.ascontiguousarray(c, np.int64) for i, c in enumerate(self.counts)},
                      str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                           "tokens": str(self.tokens),
                                           "fingerprint": json.dumps(self.fingerprint.as_dict())})
        except (SafetensorError, OSError) as e:  # safetensors reports a directory or a full disk as its own error
            raise StatsError(f"cannot write '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None


def load(path: str | Path, expected: Fingerprint | None = None) -> ActivationStats:
    """Our stats file, or PowerInfer's folder (activation/activation_N.pt, or the folder above it);
    with expected, refuse statistics made for another model."""
    path = Path(path)
    if path.is_dir():
        stats = _load_powerinfer(path / "activation" if (path / "activation").is_dir() else path)
        if expected is not None:
            stats.validate(f"'{path}'", expected.n_layer, expected.n_ff)
        return stats
    if not path.is_file():
        raise StatsError(f"activation statistics '{path}' not found: make them with hybridinfer profile")
    stats = _load_ours(path)
    if expected is not None:
        try:
            stats.fingerprint.check(expected, f"activation statistics '{path}'", "profile this model")
        except PredictorError as e:
            raise StatsError(str(e)) from None
    return stats


def _load_ours(path: Path) -> ActivationStats:
    from safetensors import SafetensorError, safe_open

    where = f"'{path}'"
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise StatsError(f"{where} is not a hybridinfer activation-statistics file: make one with "
                                 f"hybridinfer profile")
            for key in f.keys():
                if f.get_slice(key).get_dtype() != "I64":
                    raise StatsError(f"{where}: {key} is {f.get_slice(key).get_dtype()}, expected I64: "
                                     f"the file is damaged; profile the model again")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except StatsError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise StatsError(f"cannot read {where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                         f"the file is damaged; profile the model again") from None
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise StatsError(f"{where} has format_version {meta.get('format_version')!r}, this hybridinfer reads "
                         f"{FORMAT_VERSION}: profile the model again")
    tokens = meta.get("tokens", "")
    if not tokens.isdigit() or int(tokens) < 1:
        raise StatsError(f"{where}: metadata 'tokens' is {tokens!r}, expected a whole number of at least 1: "
                         f"profile the model again")
    tokens = int(tokens)
    try:
        fingerprint = Fingerprint.from_dict(json.loads(meta.get("fingerprint", "")), where)
    except ValueError as e:  # PredictorError from from_dict, or JSONDecodeError
        raise StatsError(f"{where}: metadata 'fingerprint' is not the model's fingerprint ({e}): "
                         f"profile the model again") from None
    missing = [i for i in range(fingerprint.n_layer) if f"blk.{i}.counts" not in tensors]
    if missing:
        raise StatsError(f"{where} lacks layer {missing[0]}'s counts (blk.{missing[0]}.counts): the file is "
                         f"incomplete; profile the model again")
    stats = ActivationStats([tensors[f"blk.{i}.counts"] for i in range(fingerprint.n_layer)], tokens, fingerprint)
    stats.validate(where, fingerprint.n_layer, fingerprint.n_ff)
    return stats


def _load_powerinfer(folder: Path) -> ActivationStats:
    found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _POWERINFER_FILE.fullmatch(p.name)))
    if not found:
        raise StatsError(f"'{folder}' holds neither a stats file nor PowerInfer's activation_N.pt files: "
                         f"make statistics with hybridinfer profile")
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise StatsError(f"'{folder}' lacks activation_{missing[0]}.pt: the folder is incomplete")
    try:
        import torch
    except ImportError:
        raise StatsError(f"'{folder}' holds PowerInfer's .pt statistics, which need torch to read: pip install "
                         f"torch (the CPU build is enough)") from None
    counts = []
    for i in found:
        file = folder / f"activation_{i}.pt"
        try:
            c = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged or non-tensor pickles
            raise StatsError(f"cannot read '{file}' as a weights-only tensor "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(c, torch.Tensor) or c.ndim != 1:
            raise StatsError(f"'{file}' holds {type(c).__name__}, expected a 1-D tensor of per-neuron counts")
        values = c.detach().double().numpy()
        if not np.isfinite(values).all():
            raise StatsError(f"'{file}' holds non-finite counts: the file is damaged")
        counts.append(np.round(values).astype(np.int64))
    stats = ActivationStats(counts, None, None, "powerinfer")
    stats.validate(f"'{folder}'")
    return stats


def pyplot():
    """matplotlib.pyplot drawing into files (Agg), or StatsError naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise StatsError("--plot needs matplotlib: pip install 'hybridinfer[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(stats: ActivationStats, path: str | Path, title: str) -> None:
    """Per layer, the cumulative share of activations against the share of neurons, hottest first."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, stats.n_layer))
    styles = ["-", "--", "-.", ":"]
    x = np.arange(1, stats.n_ff + 1) / stats.n_ff
    for i in range(stats.n_layer):
        cumulative = stats.cumulative(i)
        y = cumulative / cumulative[-1] if cumulative[-1] else np.zeros(stats.n_ff)
        ax.plot(x, y, color=colors[i], linestyle=styles[i % len(styles)], linewidth=1.4, label=f"layer {i}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="all neurons alike")
    ax.set_xlabel("share of the layer's neurons, hottest first")
    ax.set_ylabel("share of the layer's activations")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=max(1, math.ceil((stats.n_layer + 1) / 12)), loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise StatsError(f"cannot write the plot '{path}': {e.strerror}") from None
    finally:
        plt.close(fig)

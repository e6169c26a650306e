"""Predictor directories on disk: ours (config.json + safetensors) and PowerInfer's (model_N.pt).

Ours::

    DIR/config.json             format_version, the model's fingerprint, per-layer rank and threshold,
                                how it was trained, its validation table
    DIR/predictor.safetensors   blk.N.fc1.weight [r, n_embd] and blk.N.fc2.weight [n_ff, r], F16

A neuron is predicted active when its logit fc2 @ relu(fc1 @ x) is at or above the layer's threshold;
x is the residual stream before ffn_norm. PowerInfer's folders hold model_N.pt state dicts with the
same fc1.weight / fc2.weight and an optional config.json whose ``sparse_threshold`` is the logit
threshold (0, i.e. sigmoid 0.5, when absent). They carry no fingerprint: only their shapes are checked.

This module imports nothing from the engine; torch is imported only to read PowerInfer's .pt files.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "predictor.safetensors"
RETRAIN = "train one for this model with tools/train_predictor.py"
_POWERINFER_FILE = re.compile(r"model_(\d+)\.pt")
_PREDICTOR_TENSOR = re.compile(r"blk\.\d+\.fc[12]\.weight")  # a PowerInfer GGUF's own predictor


class PredictorError(ValueError):
    """A predictor directory that cannot be used: the message is one line naming the path and the fix."""


@dataclass(frozen=True)
class Fingerprint:
    """What a predictor was trained for. The layout hash covers tensor names and shapes, not types,
    so one predictor serves every quantisation of a model."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    layout_sha256: str

    def as_dict(self) -> dict:
        return {"architecture": self.architecture, "n_layer": self.n_layer, "n_embd": self.n_embd,
                "n_ff": self.n_ff, "layout_sha256": self.layout_sha256}

    @classmethod
    def from_dict(cls, d, where: str) -> "Fingerprint":
        if not isinstance(d, dict):
            raise PredictorError(f"{where}: 'fingerprint' is not an object: regenerate the directory")
        sizes = [d.get(name) for name in ("n_layer", "n_embd", "n_ff")]
        if (not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)
                or not isinstance(d.get("architecture"), str) or not isinstance(d.get("layout_sha256"), str)):
            raise PredictorError(f"{where}: 'fingerprint' lacks or mangles its fields (architecture, n_layer, "
                                 f"n_embd, n_ff as integers >= 1, layout_sha256): regenerate the directory")
        return cls(d["architecture"], *sizes, d["layout_sha256"])

    def check(self, expected: "Fingerprint", where: str, fix: str = RETRAIN) -> None:
        """PredictorError naming the first field that differs from the model's, and fix."""
        for name in ("architecture", "n_layer", "n_embd", "n_ff", "layout_sha256"):
            got, want = getattr(self, name), getattr(expected, name)
            if got != want:
                if name == "layout_sha256":
                    got, want = got[:12], want[:12]
                raise PredictorError(f"{where} was made for another model ({name} {got}, this model's is "
                                     f"{want}): {fix}")


def fingerprint(architecture: str, n_layer: int, n_embd: int, n_ff: int,
                tensor_shapes: dict[str, tuple[int, ...]]) -> Fingerprint:
    """The model's fingerprint; tensor_shapes maps each GGUF tensor name to its shape as GGUF gives it.

    Predictor tensors a PowerInfer GGUF carries (blk.N.fc1/fc2.weight) are left out of the hash.
    """
    h = hashlib.sha256()
    for name in sorted(tensor_shapes):
        if not _PREDICTOR_TENSOR.fullmatch(name):
            h.update(f"{name}:{','.join(str(int(d)) for d in tensor_shapes[name])};".encode())
    return Fingerprint(str(architecture), int(n_layer), int(n_embd), int(n_ff), h.hexdigest())


@dataclass
class PredictorWeights:
    """Per-layer predictor weights (F16) and logit thresholds, with the directory's other facts."""

    fc1: list[np.ndarray]  # per layer f16 [rank, n_embd]
    fc2: list[np.ndarray]  # per layer f16 [n_ff, rank]
    thresholds: list[float]  # per layer: active when logit >= threshold
    fingerprint: Fingerprint | None = None  # None for PowerInfer folders, which carry none
    info: dict = field(default_factory=dict)  # config.json's "training" and "validation", as written
    source: str = "hybridinfer"  # or "powerinfer"

    @property
    def n_layer(self) -> int:
        return len(self.fc1)

    @property
    def n_embd(self) -> int:
        return self.fc1[0].shape[1]

    @property
    def n_ff(self) -> int:
        return self.fc2[0].shape[0]

    @property
    def ranks(self) -> list[int]:
        return [w.shape[0] for w in self.fc1]

    def validate(self, where: str, n_layer: int | None = None, n_embd: int | None = None,
                 n_ff: int | None = None) -> None:
        """Shapes, ranks and thresholds consistent, and matching the model's sizes where given."""
        if not self.fc1 or len(self.fc1) != len(self.fc2) or len(self.fc1) != len(self.thresholds):
            raise PredictorError(f"{where}: {len(self.fc1)} fc1, {len(self.fc2)} fc2 and {len(self.thresholds)} "
                                 f"thresholds given, expected one of each per layer (at least one layer)")
        n_layer = self.n_layer if n_layer is None else n_layer
        if self.n_layer != n_layer:
            raise PredictorError(f"{where} has {self.n_layer} layers, the model has {n_layer}: {RETRAIN}")
        n_embd = self.fc1[0].shape[-1] if n_embd is None else n_embd
        n_ff = self.fc2[0].shape[0] if n_ff is None else n_ff
        for i, (w1, w2, t) in enumerate(zip(self.fc1, self.fc2, self.thresholds)):
            r = w1.shape[0] if w1.ndim == 2 else 0
            if w1.ndim == 2 and not 1 <= r <= n_ff:
                raise PredictorError(f"{where}: layer {i} rank {r} is out of range [1, n_ff = {n_ff}]: "
                                     f"retrain with a --rank in that range")
            if w1.shape != (r, n_embd) or w2.shape != (n_ff, r):
                raise PredictorError(f"{where}: layer {i} has fc1 {list(w1.shape)} and fc2 {list(w2.shape)}, expected "
                                     f"[{r}, {n_embd}] and [{n_ff}, {r}] (n_embd {n_embd}, n_ff {n_ff}): {RETRAIN}")
            if not isinstance(t, (int, float, np.floating, np.integer)) or not math.isfinite(t):
                raise PredictorError(f"{where}: layer {i} threshold is {t!r}, expected a finite number: "
                                     f"recalibrate with tools/train_predictor.py")
            for name, w in (("fc1", w1), ("fc2", w2)):
                if not np.isfinite(w).all():
                    raise PredictorError(f"{where}: layer {i} {name} holds non-finite weights: {RETRAIN}")


def save(path: str | Path, weights: PredictorWeights) -> None:
    """Write our format into directory path (created if missing; files there are replaced)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if weights.fingerprint is None:
        raise PredictorError(f"{path}: cannot save a predictor without the model's fingerprint")
    weights.validate(str(path))
    tensors = {}
    for i, (w1, w2) in enumerate(zip(weights.fc1, weights.fc2)):
        for name, w in (("fc1", w1), ("fc2", w2)):
            w16 = np.ascontiguousarray(w, np.float16)
            if not np.isfinite(w16).all():
                raise PredictorError(f"{path}: layer {i} {name} overflows F16 (|w| > 65504): retrain with "
                                     f"more weight decay")
            tensors[f"blk.{i}.{name}.weight"] = w16
    config = {"format_version": FORMAT_VERSION, "fingerprint": weights.fingerprint.as_dict(),
              "layers": [{"rank": r, "threshold": float(t)} for r, t in zip(weights.ranks, weights.thresholds)],
              **weights.info}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "hybridinfer-predictor"})
    (path / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def load(path: str | Path, expected: Fingerprint | None = None) -> PredictorWeights:
    """Read our directory or a PowerInfer folder; with expected, refuse one made for another model."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "not found"
        raise PredictorError(f"predictor directory '{path}' {what}: give a directory written by "
                             f"tools/train_predictor.py or a PowerInfer predictor folder")
    config = _read_config(path)
    if config is not None and "format_version" in config:
        weights = _load_ours(path, config)
        weights.validate(str(path))
        if expected is not None:
            weights.fingerprint.check(expected, f"predictor '{path}'")
        return weights
    if any(_POWERINFER_FILE.fullmatch(p.name) for p in path.iterdir()):
        weights = _load_powerinfer(path, config or {})
    else:
        raise PredictorError(f"'{path}' holds neither {CONFIG} with {WEIGHTS} nor PowerInfer's model_N.pt files: "
                             f"{RETRAIN}")
    if expected is None:
        weights.validate(str(path))
    else:
        weights.validate(str(path), expected.n_layer, expected.n_embd, expected.n_ff)
    return weights


def _read_config(path: Path) -> dict | None:
    file = path / CONFIG
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PredictorError(f"'{file}' is not valid JSON (line {e.lineno}: {e.msg}): fix it or retrain") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PredictorError(f"cannot read '{file}': {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(config, dict):
        raise PredictorError(f"'{file}' holds a JSON {type(config).__name__}, expected an object: fix it or retrain")
    return config


def _load_ours(path: Path, config: dict) -> PredictorWeights:
    where = f"'{path / CONFIG}'"
    version = config["format_version"]
    if version != FORMAT_VERSION:
        raise PredictorError(f"{where} has format_version {version!r}, this hybridinfer reads {FORMAT_VERSION}: "
                             f"use a matching hybridinfer or retrain")
    fp = Fingerprint.from_dict(config.get("fingerprint"), where)
    layers = config.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise PredictorError(f"{where} lacks a 'layers' list of {{rank, threshold}} objects: fix it or retrain")
    if len(layers) != fp.n_layer:
        raise PredictorError(f"{where} lists {len(layers)} layers, its fingerprint says {fp.n_layer}: "
                             f"the directory is damaged; retrain")
    thresholds, ranks = [], []
    for i, layer in enumerate(layers):
        t, r = layer.get("threshold"), layer.get("rank")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise PredictorError(f"{where}: layer {i} threshold is {t!r}, expected a finite number: "
                                 f"recalibrate with tools/train_predictor.py")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= fp.n_ff:
            raise PredictorError(f"{where}: layer {i} rank {r!r} is out of range [1, n_ff = {fp.n_ff}]: "
                                 f"retrain with a --rank in that range")
        thresholds.append(float(t))
        ranks.append(r)
    tensors = _read_safetensors(path / WEIGHTS)
    fc1, fc2 = [], []
    for i, r in enumerate(ranks):
        for name, shape, dest in (("fc1", (r, fp.n_embd), fc1), ("fc2", (fp.n_ff, r), fc2)):
            key = f"blk.{i}.{name}.weight"
            if key not in tensors:
                raise PredictorError(f"'{path / WEIGHTS}' lacks {key}: the directory is incomplete; retrain")
            w = tensors[key]
            if w.shape != shape:
                raise PredictorError(f"'{path / WEIGHTS}': {key} has shape {list(w.shape)}, expected {list(shape)} "
                                     f"(rank {r}, n_embd {fp.n_embd}, n_ff {fp.n_ff}): the directory is damaged; retrain")
            dest.append(w)
    info = {k: v for k, v in config.items() if k not in ("format_version", "fingerprint", "layers")}
    return PredictorWeights(fc1, fc2, thresholds, fp, info, "hybridinfer")


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise PredictorError(f"'{file}' is missing: the predictor directory is incomplete; retrain")
    try:
        with safe_open(str(file), framework="numpy") as f:
            # dtypes first: NumPy has no BF16 or F8, and safetensors fails on them with a TypeError
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype not in ("F16", "F32"):
                    raise PredictorError(f"'{file}': {key} is {dtype}, expected F16: retrain")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except PredictorError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise PredictorError(f"cannot read '{file}' ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                             f"the file is damaged; retrain") from None
    return {k: w.astype(np.float16, copy=False) for k, w in tensors.items()}


def _load_powerinfer(path: Path, config: dict) -> PredictorWeights:
    try:
        import torch
    except ImportError:
        raise PredictorError(f"'{path}' is a PowerInfer predictor folder (.pt files), which needs torch to read: "
                             f"pip install torch (the CPU build is enough)") from None
    found = sorted(int(m.group(1)) for p in path.iterdir() if (m := _POWERINFER_FILE.fullmatch(p.name)))
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise PredictorError(f"'{path}' has model_0.pt .. model_{found[-1]}.pt but lacks model_{missing[0]}.pt: "
                             f"the folder is incomplete")
    threshold = config.get("sparse_threshold", 0.0)
    if threshold is None:
        threshold = 0.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise PredictorError(f"'{path / CONFIG}': sparse_threshold is {threshold!r}, expected a finite number: fix it")
    fc1, fc2 = [], []
    for i in found:
        file = path / f"model_{i}.pt"
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged or non-tensor pickles
            raise PredictorError(f"cannot read '{file}' as a weights-only state dict "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(state, dict) or not {"fc1.weight", "fc2.weight"} <= state.keys():
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PredictorError(f"'{file}' holds {keys}, expected a state dict with fc1.weight and fc2.weight")
        extra = sorted(set(state) - {"fc1.weight", "fc2.weight"})
        if extra:
            raise PredictorError(f"'{file}' also holds {extra}: only bias-free fc1 -> ReLU -> fc2 predictors "
                                 f"are supported")
        fc1.append(state["fc1.weight"].detach().float().numpy().astype(np.float16))
        fc2.append(state["fc2.weight"].detach().float().numpy().astype(np.float16))
    return PredictorWeights(fc1, fc2, [float(threshold)] * len(fc1), None, {}, "powerinfer")

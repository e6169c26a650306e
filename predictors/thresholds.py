"""Calibrated sparsity thresholds for models whose activations have no exact zeros (SiLU llamas).

Two methods (``hybridinfer calibrate`` makes them):

- ``cett`` (ProSparse, "Sparsing Law"): neuron i's contribution to the FFN output is |a_i| * ||down[:, i]||,
  a_i = act(gate_i) * up_i. Per layer, neurons whose contribution is below the layer's threshold eps
  are dropped; eps is set so that the norm of the dropped contributions over the norm of the FFN output
  (CETT) meets a target. Stored per neuron as tau_i = eps / ||down[:, i]||: neuron i is active when
  |a_i| >= tau_i (with tau = 0 every neuron is).
- ``teal`` (TEAL): per matrix, input entries x_j with |x_j| < t are dropped (t = 0 drops none), the
  matrices being q, k, v, the attention output and the FFN's gate, up and down.

A thresholds directory holds::

    DIR/config.json              format_version, method, the model's fingerprint, what was asked,
                                 the calibration table
    DIR/thresholds.safetensors   cett: blk.N.ffn_act F32 [n_ff]; teal: blk.N.<matrix> F32 [1]

This module imports nothing from the engine.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybridinfer.predictors.format import Fingerprint, PredictorError

FORMAT_VERSION = 1
CONFIG = "config.json"
TENSORS = "thresholds.safetensors"
METHODS = ("cett", "teal")
TEAL_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RECALIBRATE = "calibrate this model with hybridinfer calibrate"


class ThresholdError(PredictorError):
    """A thresholds directory that cannot be used: one line naming the path and the fix."""


@dataclass
class Thresholds:
    method: str  # one of METHODS
    fingerprint: Fingerprint
    layers: list[dict[str, np.ndarray]]  # per layer: cett {"ffn_act": f32[n_ff]}; teal {matrix: f32[1]}
    info: dict = field(default_factory=dict)  # what was asked, the calibration table

    def ffn(self, layer: int) -> np.ndarray:
        """CETT: tau f32[n_ff] of a layer, |a_i| >= tau_i being active."""
        return self.layers[layer]["ffn_act"]

    def keeps(self, layer: int, a: np.ndarray) -> np.ndarray:
        """CETT: bool [T, n_ff], the neurons of a layer's activations a [T, n_ff] that stay active, a_i != 0
        and |a_i| >= tau_i."""
        return (np.abs(a) >= self.ffn(layer)) & (a != 0.0)

    def input(self, layer: int, matrix: str) -> float:
        """TEAL: the input threshold of one matrix of a layer."""
        return float(self.layers[layer][matrix][0])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensor names and shapes the method needs for the fingerprint's model."""
        names = ("ffn_act",) if self.method == "cett" else TEAL_MATRICES
        shape = (self.fingerprint.n_ff,) if self.method == "cett" else (1,)
        return {f"blk.{i}.{name}": shape for i in range(self.fingerprint.n_layer) for name in names}

    def validate(self, where: str) -> None:
        if self.method not in METHODS:
            raise ThresholdError(f"{where}: method {self.method!r} is not one of {', '.join(METHODS)}: {RECALIBRATE}")
        if len(self.layers) != self.fingerprint.n_layer:
            raise ThresholdError(f"{where} holds {len(self.layers)} layers, its model has {self.fingerprint.n_layer}: "
                                 f"{RECALIBRATE}")
        for key, shape in self.shapes().items():
            layer, name = key.split(".")[1:]
            t = self.layers[int(layer)].get(name)
            if t is None:
                raise ThresholdError(f"{where} lacks {key}: the directory is incomplete; {RECALIBRATE}")
            if t.shape != shape:
                raise ThresholdError(f"{where}: {key} has shape {list(t.shape)}, expected {list(shape)}: "
                                     f"{RECALIBRATE}")
            bad = ~(np.isfinite(t) & (t >= 0))
            if bad.any():
                raise ThresholdError(f"{where}: {key} holds {t[bad][0]!r}, expected finite thresholds >= 0: "
                                     f"{RECALIBRATE}")


def save(path: str | Path, th: Thresholds) -> None:
    """Write the directory path (created if missing; its files are replaced)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    path = Path(path)
    th.validate(f"thresholds '{path}'")
    tensors = {key: np.ascontiguousarray(th.layers[int(key.split(".")[1])][key.split(".")[2]], np.float32)
               for key in th.shapes()}
    config = {"format_version": FORMAT_VERSION, "method": th.method, "fingerprint": th.fingerprint.as_dict(),
              **th.info}
    try:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / TENSORS), metadata={"format": "hybridinfer-thresholds"})
        (path / CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    except (SafetensorError, OSError) as e:
        raise ThresholdError(f"cannot write '{path}': {getattr(e, 'strerror', None) or str(e).splitlines()[0]}") \
            from None


def load(path: str | Path, expected: Fingerprint | None = None) -> Thresholds:
    """Read a thresholds directory; with expected, refuse one made for another model."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "not found"
        raise ThresholdError(f"thresholds directory '{path}' {what}: {RECALIBRATE}")
    where = f"'{path / CONFIG}'"
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ThresholdError(f"{where} is not valid JSON (line {e.lineno}: {e.msg}): {RECALIBRATE}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ThresholdError(f"cannot read {where}: {getattr(e, 'strerror', None) or e}: {RECALIBRATE}") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ThresholdError(f"{where} is not a thresholds file of format_version {FORMAT_VERSION}: {RECALIBRATE}")
    try:
        fp = Fingerprint.from_dict(config.get("fingerprint"), where)
    except PredictorError as e:
        raise ThresholdError(str(e)) from None
    method = config.get("method")
    info = {k: v for k, v in config.items() if k not in ("format_version", "method", "fingerprint")}
    th = Thresholds(method, fp, [{} for _ in range(fp.n_layer)], info)
    file = path / TENSORS
    if not file.is_file():
        raise ThresholdError(f"'{file}' is missing: the directory is incomplete; {RECALIBRATE}")
    try:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                parts = key.split(".")
                if f.get_slice(key).get_dtype() != "F32" or len(parts) != 3 or not parts[1].isdigit() \
                        or not int(parts[1]) < fp.n_layer:
                    raise ThresholdError(f"'{file}': unexpected tensor {key} "
                                         f"({f.get_slice(key).get_dtype()}): {RECALIBRATE}")
                th.layers[int(parts[1])][parts[2]] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ThresholdError):
            raise
        raise ThresholdError(f"cannot read '{file}' ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                             f"{RECALIBRATE}") from None
    th.validate(f"thresholds '{path}'")
    if expected is not None:
        try:
            fp.check(expected, f"thresholds '{path}'", RECALIBRATE)
        except PredictorError as e:
            raise ThresholdError(str(e)) from None
    return th


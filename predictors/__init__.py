"""Activation predictors: which FFN neurons will fire, guessed from the layer's input.

Two floors. ``format`` (on-disk format, fingerprint, PowerInfer folders), ``mlp`` (the runtime
predictor) and ``stats`` (recall / sparsity bookkeeping) import nothing from the engine, which
imports them. ``collect``, ``train`` and ``evaluate`` drive the engine and need torch for training.
"""

from hybridinfer.predictors.format import Fingerprint, PredictorError, PredictorWeights, fingerprint, load, save
from hybridinfer.predictors.mlp import PredictorSet
from hybridinfer.predictors.stats import SparsityStats

__all__ = ["Fingerprint", "PredictorError", "PredictorWeights", "PredictorSet", "SparsityStats",
           "fingerprint", "load", "save"]

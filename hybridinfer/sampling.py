"""Token sampling in llama.cpp's order: repeat penalty, top-k, top-p, temperature, draw."""

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from hybridinfer.errors import HybridInferError


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    repeat_penalty: float = 1.0  # 1 disables
    repeat_last_n: int = 64
    seed: int | None = None  # None draws a random seed

    def __post_init__(self):
        checks = (("temp", math.isfinite(self.temp) and self.temp >= 0, "a finite number >= 0"),
                  ("top_k", self.top_k >= 0, "an integer >= 0"),
                  ("top_p", 0 < self.top_p <= 1, "a number in (0, 1]"),
                  ("repeat_penalty", math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
                   "a finite number > 0"),
                  ("repeat_last_n", self.repeat_last_n >= 0, "an integer >= 0"))
        for name, ok, expected in checks:
            if not ok:
                raise HybridInferError(f"sampling {name} is {getattr(self, name)}, expected {expected}")


class Sampler:
    """Draws tokens from logits; -inf logits are tokens that cannot come, NaN ones damaged weights."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=params.repeat_last_n)
        self.pos = 0  # position of the token drawn next: tokens accepted so far

    def accept(self, token: int) -> None:
        """Record a token of the prompt or of the output for the repeat penalty."""
        self.recent.append(token)
        self.pos += 1

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token from logits[n_vocab]."""
        p = self.p
        if p.repeat_penalty != 1.0 and self.recent:
            logits = logits.copy()
            seen = np.fromiter(set(self.recent), np.int64)
            # in the logits' precision, as llama.cpp: a tiny penalty overflows a logit to +inf,
            # which the draw below handles; -inf stays -inf (times a penalty rounded to 0 it is NaN)
            old = logits[seen]
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                new = np.where(old > 0, old / p.repeat_penalty, old * p.repeat_penalty)
            logits[seen] = np.where(old == -np.inf, old, new)
        best = int(np.argmax(logits))  # the first NaN if there is one
        if not logits[best] > -np.inf:
            what = "NaN logits" if np.isnan(logits[best]) else "a logit of -inf for every token"
            raise HybridInferError(f"the model produced {what} at position {self.pos}: its weights are damaged")
        if p.temp <= 0:
            return best
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[:p.top_k]
        kept = logits[order].astype(np.float64)
        if kept[0] == np.inf:
            # the limit of softmax: the +inf tokens share all the probability
            kept = np.where(kept == np.inf, 0.0, -np.inf)
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p
            n = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, kept = order[:n], kept[:n]
        probs = np.exp((kept - kept[0]) / p.temp)
        return int(self.rng.choice(order, p=probs / probs.sum()))

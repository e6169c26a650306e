"""Token sampling in llama.cpp's order: repeat penalty, top-k, top-p, temperature, draw."""

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    repeat_penalty: float = 1.0  # 1 disables
    repeat_last_n: int = 64
    seed: int | None = None  # None draws a random seed


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=params.repeat_last_n)

    def accept(self, token: int) -> None:
        """Record a token of the prompt or of the output for the repeat penalty."""
        self.recent.append(token)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token from logits[n_vocab]."""
        p = self.p
        if p.repeat_penalty != 1.0 and self.recent:
            logits = logits.copy()
            seen = np.fromiter(set(self.recent), np.int64)
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / p.repeat_penalty, logits[seen] * p.repeat_penalty)
        if p.temp <= 0:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        if p.top_k > 0:
            order = order[:p.top_k]
        kept = logits[order].astype(np.float64)
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p
            n = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, kept = order[:n], kept[:n]
        probs = np.exp((kept - kept[0]) / p.temp)
        return int(self.rng.choice(order, p=probs / probs.sum()))

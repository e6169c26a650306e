"""Perplexity as llama.cpp's llama-perplexity computes it: chunks of n_ctx tokens, second halves scored."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.model import Transformer


@dataclass
class Perplexity:
    n_ctx: int
    chunk_nll: list[float] = field(default_factory=list)  # mean negative log-likelihood per chunk
    ppl: float = 0.0
    err: float = 0.0  # llama.cpp's "+/-": ppl times the standard error of the mean NLL


def chunk_nll(model: Transformer, chunk: np.ndarray) -> np.ndarray:
    """The negative log-likelihood of each token of chunk's second half, the chunk run from an empty cache
    (as llama-perplexity scores a chunk: logits at positions len/2 .. len-2 against the next token);
    not finite where the logits are not."""
    first = len(chunk) // 2
    logits = model.forward(chunk, 0, all_logits=True)[first:len(chunk) - 1].astype(np.float64)
    targets = chunk[first + 1:]
    with np.errstate(all="ignore"):  # damaged weights: the caller reports the NaNs
        peak = logits.max(axis=1)
        log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        return log_z - logits[np.arange(len(targets)), targets]


def perplexity(model: Transformer, tokens: list[int], bos_id: int | None, n_chunks: int = -1,
               on_chunk: Callable[[int, float], None] = lambda i, ppl: None) -> Perplexity:
    """Score tokens (the whole text, tokenized with the model's BOS rule) in chunks of model.n_ctx.

    Each chunk starts from an empty cache; where the model adds BOS, the chunk's first token becomes
    BOS. Logits at positions n_ctx/2 .. n_ctx-2 are scored against the next token.
    """
    n_ctx = model.n_ctx
    available = len(tokens) // n_ctx
    if available < 1:
        raise HybridInferError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx} (-c)")
    n = available if n_chunks < 0 else min(n_chunks, available)
    out = Perplexity(n_ctx)
    nll_sum = nll2_sum = 0.0
    count = 0
    for i in range(n):
        chunk = np.array(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        nll = chunk_nll(model, chunk)
        if not np.isfinite(nll).all():
            raise HybridInferError(f"the model produced non-finite logits in chunk {i + 1}: its weights are damaged")
        out.chunk_nll.append(float(nll.mean()))
        nll_sum += nll.sum()
        nll2_sum += (nll * nll).sum()
        count += len(nll)
        on_chunk(i, math.exp(nll_sum / count))
    mean = nll_sum / count
    out.ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    out.err = out.ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    return out

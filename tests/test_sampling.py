"""The sampler: the same draws as the plain softmax sampler on finite logits, and never a NaN
probability: -inf logits are tokens that cannot come, +inf ones take all the probability, NaN
logits (damaged weights) are an error naming the position."""

import warnings
from collections import deque

import numpy as np
import pytest

from hybridinfer.errors import HybridInferError
from hybridinfer.sampling import Sampler, SamplingParams

N_VOCAB = 1000


def reference_draws(params: SamplingParams, accepted: list[int], logits: list[np.ndarray]) -> list[int]:
    """The sampler as it was before non-finite logits were handled, for finite logits only."""
    rng, recent, out = np.random.default_rng(params.seed), deque(accepted, maxlen=params.repeat_last_n), []
    for x in logits:
        if params.repeat_penalty != 1.0 and recent:
            x = x.copy()
            seen = np.fromiter(set(recent), np.int64)
            x[seen] = np.where(x[seen] > 0, x[seen] / params.repeat_penalty, x[seen] * params.repeat_penalty)
        if params.temp <= 0:
            out.append(int(np.argmax(x)))
        else:
            order = np.argsort(-x, kind="stable")
            order = order[:params.top_k] if params.top_k > 0 else order
            kept = x[order].astype(np.float64)
            probs = np.exp(kept - kept[0])
            probs /= probs.sum()
            if params.top_p < 1.0:
                n = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
                order, kept = order[:n], kept[:n]
            probs = np.exp((kept - kept[0]) / params.temp)
            out.append(int(rng.choice(order, p=probs / probs.sum())))
        recent.append(out[-1])
    return out


def draws(params: SamplingParams, accepted: list[int], logits: list[np.ndarray]) -> list[int]:
    sampler, out = Sampler(params), []
    for token in accepted:
        sampler.accept(token)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings on screen either
        for x in logits:
            out.append(sampler(x))
            sampler.accept(out[-1])
    return out


def random_logits(seed: int, n: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # a few exact ties, as float32 logits have
    return [np.round(rng.normal(0, 4, N_VOCAB), 2).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("params", [
    SamplingParams(seed=1), SamplingParams(seed=2, repeat_penalty=1.1), SamplingParams(seed=3, repeat_penalty=0.9),
    SamplingParams(seed=4, top_k=0, top_p=1.0, temp=1.5), SamplingParams(seed=5, top_k=5, top_p=0.5, temp=0.3),
    SamplingParams(temp=0.0, repeat_penalty=1.3),
])
def test_same_draws_as_before_on_finite_logits(params):
    logits, accepted = random_logits(params.seed or 0), list(range(0, 300, 7))
    assert draws(params, accepted, logits) == reference_draws(params, accepted, logits)


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_nan_logits_name_the_position(temp):
    logits = random_logits(0, 1)[0]
    logits[17] = np.nan
    sampler = Sampler(SamplingParams(temp=temp, seed=0))
    for token in range(5):
        sampler.accept(token)
    with pytest.raises(HybridInferError, match="NaN logits at position 5: its weights are damaged"):
        sampler(logits)


@pytest.mark.parametrize("temp", [0.0, 0.8])
def test_no_finite_logit_is_an_error(temp):
    with pytest.raises(HybridInferError, match="-inf for every token at position 0"):
        Sampler(SamplingParams(temp=temp))(np.full(N_VOCAB, -np.inf, np.float32))


@pytest.mark.parametrize("params", [SamplingParams(seed=0), SamplingParams(seed=0, top_k=0, top_p=1.0),
                                    SamplingParams(seed=0, temp=0.0), SamplingParams(seed=0, temp=1e-300)])
def test_minus_inf_logits_are_never_drawn(params):
    logits = np.full(N_VOCAB, -np.inf, np.float32)
    logits[[3, 500, 998]] = [1.0, 2.0, 1.5]
    assert set(draws(params, [], [logits] * 50)) <= {3, 500, 998}
    if params.temp <= 1e-300:
        assert draws(params, [], [logits]) == [500]


@pytest.mark.parametrize("params", [SamplingParams(seed=0), SamplingParams(seed=0, top_k=0, top_p=1.0),
                                    SamplingParams(seed=0, temp=0.0)])
def test_plus_inf_logits_share_all_the_probability(params):
    logits = random_logits(1, 1)[0]
    logits[[10, 20]] = np.inf
    got = draws(params, [], [logits] * 200)
    assert set(got) <= {10, 20} and (params.temp == 0 or set(got) == {10, 20})


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 100.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_repeat_penalties_give_a_token(penalty, dtype):
    logits = random_logits(2, 1)[0].astype(dtype)
    logits[[1, 2]] = [3e38, -3e38]
    logits[3] = -np.inf  # a penalty rounded to 0 must not make it NaN
    for temp in (0.0, 0.8):
        got = draws(SamplingParams(seed=0, temp=temp, repeat_penalty=penalty), [1, 2, 3, 4, 5], [logits] * 20)
        assert all(0 <= t < N_VOCAB and t != 3 for t in got)


@pytest.mark.parametrize("bad", [dict(temp=float("nan")), dict(temp=-1.0), dict(temp=float("inf")),
                                 dict(top_k=-1), dict(top_p=0.0), dict(top_p=float("nan")), dict(top_p=1.5),
                                 dict(repeat_penalty=0.0), dict(repeat_penalty=float("nan")),
                                 dict(repeat_penalty=float("inf")), dict(repeat_last_n=-1)])
def test_parameters_that_would_give_nan_are_refused(bad):
    with pytest.raises(HybridInferError, match=f"sampling {next(iter(bad))} is"):
        SamplingParams(**bad)

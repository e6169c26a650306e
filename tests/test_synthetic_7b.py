"""tools/make_synthetic_7b.py at a tiny shape: true and predicted firing rates follow the power law it aims
at (the hottest 20% of neurons carry 80% of activations, 11% active overall), on tokens it was not set on."""

import numpy as np
import pytest

import make_synthetic_7b as synth  # tools/ is on sys.path, see conftest.py
from hybridinfer.ffn import make_ffn
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import ModelArgs, load_weights
from hybridinfer.model import Transformer
from hybridinfer.predictors import PredictorSet
from hybridinfer.predictors.activity import ActivationStats

N_LAYER, N_EMBD, N_FF, N_VOCAB, ACTIVE, TOP_SHARE, N_TOKENS = 2, 256, 1024, 512, 0.11, 0.8, 256


def test_power_law_rates():
    for n in (1024, 11008):
        rates = synth.power_law_rates(n, ACTIVE, TOP_SHARE)
        assert rates.mean() == pytest.approx(ACTIVE)
        assert rates[:round(0.2 * n)].sum() / rates.sum() == pytest.approx(TOP_SHARE)
        assert np.all(np.diff(rates) <= 0) and rates.max() <= synth.MAX_RATE and rates.min() > 0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "synth.gguf"
    rates = synth.layer_rates(np.random.default_rng(0), N_LAYER, N_FF, ACTIVE, TOP_SHARE)
    synth.write_model(path, N_LAYER, N_EMBD, N_FF, 4, N_VOCAB, 0)
    synth.set_gate_offsets(path, rates, 16, 32, 1)
    synth.write_predictor(path, path.with_suffix(".predictor"), 64, rates, 16, 32, 2)
    gguf = GGUFFile(path)
    args = ModelArgs.from_metadata(gguf.metadata)
    return args, load_weights(gguf, args), path.with_suffix(".predictor"), rates


def follows(counts: list[np.ndarray], n_tokens: int, rates: list[np.ndarray], tolerance: float, hot: float) -> None:
    stats = ActivationStats([c.astype(np.int64) for c in counts], n_tokens, None)
    for layer, (c, r) in enumerate(zip(counts, rates)):
        assert c.mean() / n_tokens == pytest.approx(ACTIVE, abs=tolerance)
        assert stats.hot_shares(layer, (0.8,))[0] == pytest.approx(0.2, abs=hot)  # 80% from about 20%
        assert np.corrcoef(c / n_tokens, r)[0, 1] > 0.9


def test_true_rates_follow_the_power_law(synthetic):
    args, weights, _, rates = synthetic
    dense = make_ffn("off", args, weights.blk, N_TOKENS)
    counts = [np.zeros(N_FF) for _ in range(N_LAYER)]

    def ffn(layer, blk, resid, xn, out):
        dense(layer, blk, resid, xn, out)
        counts[layer] += (dense.gate[:N_TOKENS] != 0).sum(0)  # act(gate) * up is 0 exactly where inactive

    tokens = np.random.default_rng(9).integers(3, N_VOCAB, N_TOKENS)  # not the tokens the offsets were set on
    Transformer(args, weights, N_TOKENS, ffn, n_batch=N_TOKENS).forward(tokens, 0)
    follows(counts, N_TOKENS, rates, 0.01, 0.02)


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])  # q4_0: bench's --predictor-type for the 7B file
def test_predicted_rates_follow_the_power_law(synthetic, qtype):
    args, weights, predictor_path, rates = synthetic
    predictor = PredictorSet.load(predictor_path, qtype=qtype)
    n_tokens = N_TOKENS
    counts = [np.zeros(N_FF) for _ in range(N_LAYER)]
    ffn = make_ffn("predicted", args, weights.blk, 1, predictor)

    def recorded(layer, blk, resid, xn, out):
        counts[layer][predictor.active_indices(layer, resid[0])] += 1
        ffn(layer, blk, resid, xn, out)

    model = Transformer(args, weights, n_tokens, recorded)
    for pos, token in enumerate(np.random.default_rng(9).integers(3, N_VOCAB, n_tokens)):
        model.forward(np.array([token]), pos)
    follows(counts, n_tokens, rates, 0.02, 0.04)

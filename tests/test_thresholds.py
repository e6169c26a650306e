"""Calibrated sparsity on models without exact zeros (CETT and TEAL thresholds) and dReLU: the definitions
against NumPy, thresholds of zero against dense mode, the thresholds directory, calibrate end to end."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridinfer.calibrate import cett_curve, cett_thresholds, down_norms, teal_thresholds
from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import ActiveSet, DenseFFN, ExactSparseFFN, make_ffn
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.inputs import InputSparseFFN, InputSparsity
from hybridinfer.loader import FFNActivation, ModelArgs, load_weights, model_fingerprint
from hybridinfer.model import N_BATCH, Transformer
from hybridinfer.predictors import PredictorSet, SparsityStats
from hybridinfer.predictors.thresholds import TEAL_MATRICES, ThresholdError, Thresholds, load, save
from make_gguf import write_llama_gguf
from test_cli import assert_one_line_error, cli

TOKENS = np.random.default_rng(5).integers(3, 200, 12)


def silu(g):
    return g / (1 + np.exp(-g))


@pytest.fixture(scope="module")
def silu_f32(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "silu.gguf", qtype=Q.F32, ffn_act=None)


@pytest.fixture(scope="module")
def silu_q8(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "silu-q8.gguf", qtype=Q.Q8_0, ffn_act=None, seed=1)


def open_model(path, ffn_act=None):
    gguf = GGUFFile(path)
    args = ModelArgs.from_metadata(gguf.metadata, ffn_act)
    return gguf, args, load_weights(gguf, args)


def random_cett(gguf, args, rng, scale):
    fp = model_fingerprint(gguf, args)
    return Thresholds("cett", fp, [{"ffn_act": (scale * rng.random(args.n_ff)).astype(np.float32)}
                                   for _ in range(args.n_layer)])


def decode_logits(model, tokens):
    return np.stack([model.forward(tokens[i:i + 1], i)[0].copy() for i in range(len(tokens))])


def test_cett_layer_against_numpy(silu_f32):
    """The neurons CETT thresholds drop and the FFN output without them, against NumPy."""
    gguf, args, weights = open_model(silu_f32)
    rng = np.random.default_rng(0)
    th = random_cett(gguf, args, rng, 0.3)
    blk = weights.blk[1]
    xn = rng.standard_normal((5, args.n_embd)).astype(np.float32)
    g, u, d = blk.ffn_gate.values(), blk.ffn_up.values(), blk.ffn_down.values()
    a = silu(xn @ g.T) * (xn @ u.T)
    keep = (np.abs(a) >= th.ffn(1)) & (a != 0)
    assert 0.2 < keep.mean() < 0.8
    mask = np.zeros_like(keep)
    gate, up = np.zeros(keep.shape, np.float32), np.zeros(keep.shape, np.float32)
    ActiveSet(args.ffn_act, th).of(1, blk, xn, gate, up, mask)
    np.testing.assert_array_equal(mask, keep)
    stats = SparsityStats(args.n_layer, args.n_ff)
    ffn = ExactSparseFFN(args, 8, ActiveSet(args.ffn_act, th), stats)
    for rows in (xn, xn[:1]):  # a batch and one token
        out = np.zeros((len(rows), args.n_embd), np.float32)
        ffn(1, blk, rows, rows, out)
        np.testing.assert_allclose(out, (a[:len(rows)] * keep[:len(rows)]) @ d.T, rtol=1e-4, atol=1e-5)
    counted = keep.sum() + keep[:1].sum()  # the batch's five tokens and the single one
    assert stats.layers()[1]["true_sparsity"] == pytest.approx(1 - counted / (6 * args.n_ff))


def test_cett_curve_and_thresholds_against_numpy():
    """Each grid point's sparsity and CETT, and tau = eps / ||down[:, i]||."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 32)).astype(np.float32) * rng.random(32).astype(np.float32)
    down = rng.standard_normal((16, 32)).astype(np.float32)
    down[:, 3] = 0.0  # a neuron that contributes nothing: never active
    curve = cett_curve(a, down, down_norms(down))
    norms = np.linalg.norm(down, axis=0)
    contrib = np.abs(a) * norms
    for k in (0, 10, 30, len(curve.eps) - 1):
        drop = contrib < curve.eps[k]
        assert curve.sparsity[k] == pytest.approx(drop.mean())
        cett = np.mean(np.linalg.norm(np.where(drop, a, 0) @ down.T, axis=1) / np.linalg.norm(a @ down.T, axis=1))
        assert curve.cett[k] >= cett - 1e-6  # the curve is made monotone, so never below the raw value
    assert curve.sparsity[0] == 0.0 and curve.cett[0] == 0.0 and np.all(np.diff(curve.cett) >= 0)
    target = float(curve.cett[20])
    from hybridinfer.predictors.format import Fingerprint
    fp = Fingerprint("llama", 1, 16, 32, "x")
    tau = cett_thresholds([curve], [norms.astype(np.float32)], target, fp, {}).ffn(0)
    eps = curve.eps_for(target)
    np.testing.assert_allclose(np.delete(tau, 3), eps / np.delete(norms, 3), rtol=1e-6)
    assert tau[3] == np.finfo(np.float32).max


@pytest.mark.parametrize("fixture", ["silu_f32", "silu_q8"])
def test_zero_cett_thresholds_equal_dense(request, fixture):
    """Exact mode with CETT thresholds of zero is dense mode bit for bit (the same arithmetic)."""
    gguf, args, weights = open_model(request.getfixturevalue(fixture))
    th = random_cett(gguf, args, np.random.default_rng(0), 0.0)
    dense = Transformer(args, weights, 32)
    exact = Transformer(args, weights, 32, make_ffn("exact", args, weights.blk, N_BATCH, cett=th))
    np.testing.assert_array_equal(decode_logits(exact, TOKENS), decode_logits(dense, TOKENS))
    np.testing.assert_array_equal(exact.forward(TOKENS, 0, True), dense.forward(TOKENS, 0, True))
    th.layers[0]["ffn_act"][:] = 0.05  # some neurons dropped: a different result
    changed = Transformer(args, weights, 32, make_ffn("exact", args, weights.blk, N_BATCH, cett=th))
    assert np.abs(changed.forward(TOKENS, 0, True) - dense.forward(TOKENS, 0, True)).max() > 1e-4


def test_predicted_mode_with_cett_counts_the_thresholded_set(silu_f32):
    """Predicted mode on a SiLU model: an all-active predictor is dense (float rounding), and --stats
    measures it against the CETT set."""
    gguf, args, weights = open_model(silu_f32)
    th = random_cett(gguf, args, np.random.default_rng(2), 0.3)
    everything = PredictorSet.all_active(args.n_layer, args.n_embd, args.n_ff)
    stats = SparsityStats(args.n_layer, args.n_ff)
    predicted = Transformer(args, weights, 32, make_ffn("predicted", args, weights.blk, N_BATCH, everything, stats, th))
    expected = decode_logits(Transformer(args, weights, 32), TOKENS)
    np.testing.assert_allclose(decode_logits(predicted, TOKENS), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    o = stats.overall()
    assert o["recall"] == 1.0 and o["predicted_sparsity"] == 0.0 and 0.2 < o["true_sparsity"] < 0.8


def teal(gguf, args, value):
    fp = model_fingerprint(gguf, args)
    return Thresholds("teal", fp, [{name: np.array([value], np.float32) for name in TEAL_MATRICES}
                                   for _ in range(args.n_layer)])


@pytest.mark.parametrize("fixture", ["silu_f32", "silu_q8"])
def test_teal_matrix_against_numpy(request, fixture):
    """Each matrix's dropped inputs and output, decode (column kernel) and batch (masked mat-mul)."""
    gguf, args, weights = open_model(request.getfixturevalue(fixture))
    inputs = InputSparsity(weights.blk, teal(gguf, args, 0.7), 4)
    inputs.counting = True
    rng = np.random.default_rng(3)
    for name in TEAL_MATRICES:
        m = getattr(weights.blk[0], name)
        x = rng.standard_normal((3, m.n_in)).astype(np.float32)
        xm = np.where(np.abs(x) >= 0.7, x, 0).astype(np.float32)
        want = np.zeros((3, m.n_out), np.float32)
        m(xm, want)  # the dense kernel on the masked input: the same arithmetic
        reference = xm @ m.values().T
        np.testing.assert_allclose(want, reference, rtol=0, atol=0.03 * np.abs(reference).max())
        for rows in (x, x[:1]):
            out = np.zeros((len(rows), m.n_out), np.float32)
            inputs(0, name, m, rows, out)
            np.testing.assert_allclose(out, want[:len(rows)], rtol=0, atol=1e-5 * np.abs(want).max())
    s = inputs.sparsity()[0]
    assert np.all((0.4 < s) & (s < 0.6))  # |N(0, 1)| < 0.7: about 52%


def test_zero_teal_thresholds_equal_dense(silu_q8):
    """Input mode with thresholds of zero: batches bit for bit dense, decode to float rounding (the
    column kernel sums the same integer block products in another order)."""
    gguf, args, weights = open_model(silu_q8)
    inputs = InputSparsity(weights.blk, teal(gguf, args, 0.0), N_BATCH)
    sparse = Transformer(args, weights, 32, InputSparseFFN(args, N_BATCH, inputs), inputs=inputs)
    dense = Transformer(args, weights, 32)
    np.testing.assert_array_equal(sparse.forward(TOKENS, 0, True), dense.forward(TOKENS, 0, True))
    expected = decode_logits(dense, TOKENS)
    np.testing.assert_allclose(decode_logits(sparse, TOKENS), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fixture", ["silu_f32", "silu_q8"])
def test_teal_decode_paths_agree(request, fixture):
    """With inputs dropped: the fused decode step (a kernel call per block) and the step matrix by matrix
    (as --stats runs it) agree to float rounding; the masked batch too, but for inputs whose magnitude
    lies within rounding of their threshold, which one path keeps and the other drops (from the third
    position on, where the batch's mat-muls sum in another order than the mat-vecs): 6.6e-4 at most here,
    against 0.3 for the dropped inputs themselves (dense)."""
    gguf, args, weights = open_model(request.getfixturevalue(fixture))

    def model(counting):
        inputs = InputSparsity(weights.blk, teal(gguf, args, 0.4), N_BATCH)
        return Transformer(args, weights, 32, InputSparseFFN(args, N_BATCH, inputs, counting), inputs=inputs)
    fused, counted = model(False), model(True)
    assert fused.inputs.fused and not counted.inputs.fused
    batch = fused.forward(TOKENS, 0, True).copy()
    stepped = decode_logits(fused, TOKENS)
    tol = 1e-5 * np.abs(batch).max()
    np.testing.assert_allclose(decode_logits(counted, TOKENS), stepped, rtol=0, atol=tol)
    np.testing.assert_allclose(stepped[:2], batch[:2], rtol=0, atol=tol)
    np.testing.assert_allclose(stepped, batch, rtol=0, atol=50 * tol)
    assert np.all((0.2 < counted.inputs.sparsity()) & (counted.inputs.sparsity() < 0.9))
    assert np.abs(decode_logits(Transformer(args, weights, 32), TOKENS) - batch).max() > 1000 * tol


def test_teal_thresholds_are_quantiles():
    from hybridinfer.predictors.format import Fingerprint
    rng = np.random.default_rng(4)
    samples = [{"attn_q": rng.random((50, 8)), "attn_output": rng.random((50, 8)), "ffn_gate": rng.random((50, 8)),
                "ffn_down": rng.random((50, 16))}]
    th = teal_thresholds(samples, 0.4, Fingerprint("llama", 1, 8, 16, "x"))
    for name, source in (("attn_k", "attn_q"), ("attn_output", "attn_output"), ("ffn_up", "ffn_gate")):
        assert th.input(0, name) == pytest.approx(np.quantile(samples[0][source], 0.4), rel=1e-6)
        assert np.mean(samples[0][source] < th.input(0, name)) == pytest.approx(0.4, abs=0.01)


def test_drelu_modes(tmp_path):
    """dReLU: relu(gate) * relu(up) in every mode; exact is dense bit for bit, an all-active predictor to
    float rounding; the truly active set needs both projections positive."""
    path = write_llama_gguf(tmp_path / "drelu.gguf", ffn_act="drelu")
    gguf, args, weights = open_model(path)
    assert args.ffn_act == FFNActivation("drelu")
    dense = Transformer(args, weights, 32)
    stats = SparsityStats(args.n_layer, args.n_ff)
    exact = Transformer(args, weights, 32, make_ffn("exact", args, weights.blk, N_BATCH, stats=stats))
    expected = decode_logits(dense, TOKENS)
    np.testing.assert_array_equal(decode_logits(exact, TOKENS), expected)
    assert 0.65 < stats.overall()["true_sparsity"] < 0.85  # both of two random signs positive: a quarter
    everything = PredictorSet.all_active(args.n_layer, args.n_embd, args.n_ff)
    predicted = Transformer(args, weights, 32, make_ffn("predicted", args, weights.blk, N_BATCH, everything))
    np.testing.assert_allclose(decode_logits(predicted, TOKENS), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # against NumPy, one layer: relu(g) * relu(u)
    blk = weights.blk[0]
    xn = np.random.default_rng(0).standard_normal((2, args.n_embd)).astype(np.float32)
    out = np.zeros((2, args.n_embd), np.float32)
    DenseFFN(args, 2)(0, blk, xn, xn, out)
    g, u = xn @ blk.ffn_gate.values().T, xn @ blk.ffn_up.values().T
    np.testing.assert_allclose(out, (np.maximum(g, 0) * np.maximum(u, 0)) @ blk.ffn_down.values().T,
                               rtol=1e-4, atol=1e-5)
    silu_out = np.zeros_like(out)
    DenseFFN(ModelArgs.from_metadata(gguf.metadata, FFNActivation("relu")), 2)(0, blk, xn, xn, silu_out)
    assert np.abs(silu_out - out).max() > 1e-3


def test_thresholds_directory_round_trip_and_refusals(silu_f32, tmp_path):
    gguf, args, _ = open_model(silu_f32)
    th = random_cett(gguf, args, np.random.default_rng(0), 0.1)
    save(tmp_path / "th", th)
    back = load(tmp_path / "th", model_fingerprint(gguf, args))
    assert back.method == "cett" and np.array_equal(back.ffn(1), th.ffn(1))
    other = write_llama_gguf(tmp_path / "other.gguf", n_ff=256, ffn_act=None)
    g2 = GGUFFile(other)
    with pytest.raises(ThresholdError, match="made for another model"):
        load(tmp_path / "th", model_fingerprint(g2, ModelArgs.from_metadata(g2.metadata)))
    for bad in (-1.0, np.nan, np.inf):
        th.layers[0]["ffn_act"][5] = bad
        with pytest.raises(ThresholdError, match="expected finite thresholds >= 0"):
            save(tmp_path / "bad", th)
    with pytest.raises(ThresholdError, match="not found"):
        load(tmp_path / "missing")
    config = json.loads((tmp_path / "th" / "config.json").read_text())
    (tmp_path / "th" / "config.json").write_text(json.dumps({**config, "format_version": 9}))
    with pytest.raises(ThresholdError, match="format_version"):
        load(tmp_path / "th")


def test_active_set_refuses_silu_without_thresholds():
    with pytest.raises(HybridInferError, match="no exact zeros"):
        ActiveSet(FFNActivation("silu")).check()


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, silu_f32):
    tmp = tmp_path_factory.mktemp("cli")
    gguf, args, _ = open_model(silu_f32)
    save(tmp / "cett", random_cett(gguf, args, np.random.default_rng(0), 0.1))
    save(tmp / "teal", teal(gguf, args, 0.5))
    nan = random_cett(gguf, args, np.random.default_rng(0), 0.1)
    save(tmp / "nan", nan)
    file = tmp / "nan" / "thresholds.safetensors"
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(file))
    tensors["blk.0.ffn_act"][3] = np.nan  # written past save's checks, as a damaged file would be
    save_file(tensors, str(file))
    other = write_llama_gguf(tmp / "other.gguf", n_ff=256, ffn_act=None)
    text = tmp / "text.txt"
    text.write_text("the and a then there in " * 200, encoding="utf-8")
    return tmp, other, text


@pytest.mark.parametrize("extra, words", [
    (["--sparse", "predicted", "--thresholds", "{tmp}/cett"], ["needs a predictor", "--thresholds DIR"]),
    (["--thresholds", "{tmp}/nan"], ["expected finite thresholds >= 0"]),
    (["--sparse", "exact", "--thresholds", "{tmp}/teal"], ["TEAL thresholds", "--sparse input"]),
    (["--sparse", "input"], ["needs TEAL thresholds"]),
    (["--sparse", "input", "--thresholds", "{tmp}/cett"], ["needs TEAL thresholds"]),
    (["--sparse", "off", "--thresholds", "{tmp}/cett"], ["CETT thresholds", "not --sparse off"]),
    (["--sparse", "exact"], ["exact zeros", "calibrate --method cett"]),
    (["--thresholds", "{tmp}/missing"], ["not found"]),
])
def test_run_refuses_bad_threshold_options(cli_setup, silu_f32, extra, words):
    tmp = cli_setup[0]
    result = cli("run", "-m", str(silu_f32), "-p", "the", "-n", "2", *[e.format(tmp=tmp) for e in extra])
    assert_one_line_error(result, *words)


def test_thresholds_for_another_model_refused(cli_setup):
    tmp, other, _ = cli_setup
    assert_one_line_error(cli("run", "-m", str(other), "-p", "the", "-n", "2", "--thresholds", str(tmp / "cett")),
                          "made for another model")


@pytest.mark.parametrize("goal, words", [
    (["--sparsity", "1"], ["out of range [0, 1)"]), (["--sparsity", "-0.1"], ["out of range [0, 1)"]),
    (["--sparsity", "nan"], ["out of range [0, 1)"]), (["--ppl-increase", "0"], ["out of range"]),
    (["--ppl-increase", "-2"], ["out of range"]), ([], ["one of the arguments"]),
    (["--sparsity", "0.3", "--ppl-increase", "1"], ["not allowed with"]),
])
def test_calibrate_refuses_bad_goals(cli_setup, silu_f32, goal, words):
    tmp, _, text = cli_setup
    result = cli("calibrate", str(silu_f32), "--data", str(text), "--method", "cett", *goal, "-o", str(tmp / "out"))
    assert_one_line_error(result, *words)


def test_drelu_needs_an_up_projection(tmp_path):
    path = write_llama_gguf(tmp_path / "noup.gguf", drop_tensor="blk.0.ffn_up.weight")
    assert_one_line_error(cli("run", "-m", str(path), "-p", "the", "-n", "2", "--ffn-act", "drelu"),
                          "dReLU", "up projection")


@pytest.mark.parametrize("method", ["cett", "teal"])
def test_calibrate_sparsity_end_to_end(cli_setup, silu_f32, method):
    """calibrate --sparsity on a small model: the thresholds reach about that sparsity, and run uses them."""
    tmp, _, text = cli_setup
    out = tmp / f"cal-{method}"
    result = cli("calibrate", str(silu_f32), "--data", str(text), "--method", method, "--sparsity", "0.5",
                 "--tokens", "128", "-c", "32", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.1)
    assert len(summary["layers"]) == 2 and summary["calibration_ppl"] > 0
    run = cli("run", "-m", str(silu_f32), "-p", "the and", "-n", "4", "--thresholds", str(out), "--stats", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["sparse"] == ("exact" if method == "cett" else "input")


def test_sparsity_sweep(cli_setup, silu_f32, tmp_path):
    """hybridinfer sparsity: every method's rows, ratios against the dense row, per-layer ratios, the plot;
    top-k keeps exactly its share and the calibrated TEAL setting its inputs."""
    pytest.importorskip("matplotlib")
    tmp, _, text = cli_setup
    result = cli("sparsity", str(silu_f32), "-f", str(text), "-c", "32", "--chunks", "2", "--thresholds",
                 str(tmp / "teal"), "--plot", str(tmp_path / "sweep.png"), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert rows[0]["method"] == "dense" and rows[0]["ppl_ratio"] == 1.0
    assert {r["method"] for r in rows} == {"dense", "top-k", "FATReLU threshold", "CETT", "TEAL (inputs)"}
    top = [r for r in rows if r["method"] == "top-k"]
    assert [round(r["activation_ratio"], 2) for r in top] == [0.7, 0.5, 0.35, 0.25, 0.15]
    assert all(len(r["layers"]) == 2 and r["ppl"] > 0 for r in rows)
    cett = [r["activation_ratio"] for r in rows if r["method"] == "CETT"]
    assert cett == sorted(cett, reverse=True)  # a larger CETT target drops more
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert_one_line_error(cli("sparsity", str(silu_f32), "-f", str(tmp_path / "none.txt")), "cannot read")

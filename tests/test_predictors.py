"""Predictors: the on-disk format and its errors, PowerInfer folders, the runtime MLP, the statistics,
and the recording / masked FFN wrappers on a small random ReLU model."""

import json
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from hybridinfer.predictors.format import (CONFIG, WEIGHTS, Fingerprint, PredictorError, PredictorWeights, fingerprint, load,
                               save)
from hybridinfer.predictors.mlp import PredictorSet
from hybridinfer.predictors.stats import SparsityStats

N_LAYER, N_EMBD, N_FF, RANK = 3, 64, 96, 16
SHAPES = {"token_embd.weight": (N_EMBD, 300), "blk.0.ffn_gate.weight": (N_EMBD, N_FF), "output_norm.weight": (N_EMBD,)}


def _fp(**change) -> Fingerprint:
    fp = fingerprint("llama", N_LAYER, N_EMBD, N_FF, SHAPES)
    return Fingerprint(**{**fp.as_dict(), **change})


def _weights(seed: int = 0, ranks=(RANK,) * N_LAYER) -> PredictorWeights:
    rng = np.random.default_rng(seed)
    fc1 = [(rng.standard_normal((r, N_EMBD)) / 8).astype(np.float16) for r in ranks]
    fc2 = [(rng.standard_normal((N_FF, r)) / 4).astype(np.float16) for r in ranks]
    return PredictorWeights(fc1, fc2, [0.25, -0.5, 1.0][:len(ranks)], _fp(),
                            {"training": {"seed": seed}, "validation": {"overall": {"recall": 0.95}}})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "pred"
    save(path, _weights())
    return path


def _one_line_error(fn, *words):
    with pytest.raises(PredictorError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


# ---- format ------------------------------------------------------------------------------------

def test_round_trip(saved):
    w = _weights()
    back = load(saved, _fp())
    assert back.fingerprint == w.fingerprint and back.source == "hybridinfer"
    assert back.thresholds == w.thresholds and back.ranks == w.ranks
    for a, b in zip(w.fc1 + w.fc2, back.fc1 + back.fc2):
        assert b.dtype == np.float16 and np.array_equal(a, b)
    assert back.info == w.info
    config = json.loads((saved / CONFIG).read_text())
    assert config["format_version"] == 1
    assert config["layers"] == [{"rank": RANK, "threshold": t} for t in w.thresholds]
    assert set(config["fingerprint"]) == {"architecture", "n_layer", "n_embd", "n_ff", "layout_sha256"}


def test_round_trip_per_layer_ranks(tmp_path):
    save(tmp_path / "p", _weights(ranks=(4, 16, 96)))
    assert load(tmp_path / "p").ranks == [4, 16, 96]


def test_fingerprint_covers_names_and_shapes_only():
    fp = fingerprint("llama", 3, N_EMBD, N_FF, SHAPES)
    assert fp == fingerprint("llama", 3, N_EMBD, N_FF, dict(reversed(list(SHAPES.items()))))
    assert fp != fingerprint("llama", 3, N_EMBD, N_FF, {**SHAPES, "blk.0.ffn_gate.weight": (N_EMBD, N_FF + 1)})
    assert fp != fingerprint("llama", 3, N_EMBD, N_FF, {**SHAPES, "output.weight": (N_EMBD, 300)})
    # a PowerInfer GGUF's own predictor tensors do not change the model's identity
    assert fp == fingerprint("llama", 3, N_EMBD, N_FF, {**SHAPES, "blk.0.fc1.weight": (N_EMBD, 8)})


def test_missing_directory(tmp_path):
    _one_line_error(lambda: load(tmp_path / "nope"), str(tmp_path / "nope"), "not found", "train_predictor.py")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: load(tmp_path / "file"), "not a directory")


def test_empty_directory(tmp_path):
    _one_line_error(lambda: load(tmp_path), str(tmp_path), "model_N.pt")


def test_missing_weights_file(saved):
    (saved / WEIGHTS).unlink()
    _one_line_error(lambda: load(saved), str(saved / WEIGHTS), "missing")


def test_missing_layer(saved):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(saved / WEIGHTS))
    del tensors["blk.2.fc2.weight"]
    save_file(tensors, str(saved / WEIGHTS))
    _one_line_error(lambda: load(saved), "blk.2.fc2.weight", "incomplete")


def test_damaged_weights_file(saved):
    (saved / WEIGHTS).write_bytes(b"\x10\x00\x00\x00garbage")
    _one_line_error(lambda: load(saved), str(saved / WEIGHTS), "damaged")


def test_bad_json(saved):
    (saved / CONFIG).write_text('{"format_version": 1,')
    _one_line_error(lambda: load(saved), str(saved / CONFIG), "not valid JSON")
    (saved / CONFIG).write_text("[1, 2]")
    _one_line_error(lambda: load(saved), "expected an object")


def _edit_config(path, fn):
    config = json.loads((path / CONFIG).read_text())
    fn(config)
    (path / CONFIG).write_text(json.dumps(config))


def test_shapes_not_matching(saved):
    # config says rank 8 for layer 1, the weights hold rank 16
    _edit_config(saved, lambda c: c["layers"][1].update(rank=8))
    _one_line_error(lambda: load(saved), "blk.1.fc1.weight", "[16, 64]", "[8, 64]")


def test_layer_count_not_matching(saved):
    _edit_config(saved, lambda c: c["layers"].pop())
    _one_line_error(lambda: load(saved), "lists 2 layers")


def test_fingerprint_mismatch(saved):
    _one_line_error(lambda: load(saved, _fp(n_ff=128)), "another model", "n_ff 96", "128", "train_predictor.py")
    _one_line_error(lambda: load(saved, _fp(layout_sha256="0" * 64)), "layout_sha256")
    _one_line_error(lambda: PredictorSet.load(saved, _fp(n_layer=4)), "n_layer")
    assert PredictorSet.load(saved, _fp()).n_layer == N_LAYER


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None])
def test_threshold_not_finite(saved, bad):
    _edit_config(saved, lambda c: c["layers"][0].update(threshold=bad))
    _one_line_error(lambda: load(saved), "layer 0 threshold", "finite")


@pytest.mark.parametrize("bad", [0, -3, N_FF + 1, 2.5])
def test_rank_out_of_range(saved, bad):
    _edit_config(saved, lambda c: c["layers"][2].update(rank=bad))
    _one_line_error(lambda: load(saved), "layer 2 rank", "out of range", f"n_ff = {N_FF}")


def test_newer_format_version(saved):
    _edit_config(saved, lambda c: c.update(format_version=2))
    _one_line_error(lambda: load(saved), "format_version 2")


def test_arrays_checked():
    w = _weights()
    w.thresholds[1] = float("nan")
    _one_line_error(lambda: PredictorSet(w), "layer 1 threshold")
    w = _weights()
    w.fc2[0] = w.fc2[0][:, :4]
    _one_line_error(lambda: PredictorSet(w), "layer 0", "fc2")
    with pytest.raises(PredictorError):
        PredictorSet.from_arrays([np.zeros((0, N_EMBD))], [np.zeros((N_FF, 0))], [0.0])


# ---- PowerInfer folders ------------------------------------------------------------------------

def _write_powerinfer(path, n_layer=N_LAYER, config=None, extra=None, seed=0):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    path.mkdir()
    states = []
    for i in range(n_layer):
        state = {"fc1.weight": torch.from_numpy(rng.standard_normal((RANK, N_EMBD)).astype(np.float16)),
                 "fc2.weight": torch.from_numpy(rng.standard_normal((N_FF, RANK)).astype(np.float16)),
                 **(extra or {})}
        torch.save(state, path / f"model_{i}.pt")
        states.append(state)
    if config is not None:
        (path / CONFIG).write_text(json.dumps(config))
    return states


def test_powerinfer_folder(tmp_path):
    states = _write_powerinfer(tmp_path / "pi")
    w = load(tmp_path / "pi", _fp())
    assert w.source == "powerinfer" and w.fingerprint is None
    assert w.thresholds == [0.0] * N_LAYER  # logit 0, sigmoid 0.5
    for i, s in enumerate(states):
        assert np.array_equal(w.fc1[i], s["fc1.weight"].numpy()) and np.array_equal(w.fc2[i], s["fc2.weight"].numpy())
    p = PredictorSet.load(tmp_path / "pi", _fp())
    x = np.random.default_rng(1).standard_normal((2, N_EMBD)).astype(np.float32)
    ref = np.maximum(x @ w.fc1[1].astype(np.float32).T, 0) @ w.fc2[1].astype(np.float32).T
    np.testing.assert_allclose(p.logits(1, x), ref, rtol=1e-4, atol=1e-3)


def test_powerinfer_threshold_from_config(tmp_path):
    _write_powerinfer(tmp_path / "pi", config={"sparse_threshold": 0.7, "something_else": 1})
    assert load(tmp_path / "pi").thresholds == [0.7] * N_LAYER


def test_powerinfer_errors(tmp_path):
    _write_powerinfer(tmp_path / "pi")
    (tmp_path / "pi" / "model_1.pt").unlink()
    _one_line_error(lambda: load(tmp_path / "pi"), "lacks model_1.pt")
    _write_powerinfer(tmp_path / "short", n_layer=2)
    _one_line_error(lambda: load(tmp_path / "short", _fp()), "has 2 layers", "the model has 3")
    torch = pytest.importorskip("torch")
    _write_powerinfer(tmp_path / "bias", extra={"fc1.bias": torch.zeros(RANK)})
    _one_line_error(lambda: load(tmp_path / "bias"), "fc1.bias", "bias-free")
    _write_powerinfer(tmp_path / "wide")
    _one_line_error(lambda: load(tmp_path / "wide", _fp(n_embd=128)), "expected [16, 128]")
    _write_powerinfer(tmp_path / "nan", config={"sparse_threshold": float("nan")})
    _one_line_error(lambda: load(tmp_path / "nan"), "sparse_threshold")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model_0.pt").write_bytes(b"not a pickle")
    _one_line_error(lambda: load(tmp_path / "junk"), "model_0.pt", "weights-only")


# ---- runtime MLP -------------------------------------------------------------------------------

def test_all_active_predictor():
    p = PredictorSet.all_active(N_LAYER, N_EMBD, N_FF)
    x = np.random.default_rng(0).standard_normal((5, N_EMBD)).astype(np.float32)
    out = np.zeros((5, N_FF), bool)
    p.predict_mask(2, x, out)
    assert out.all()
    assert np.array_equal(p.active_indices(0, x[0]), np.arange(N_FF, dtype=np.int32))


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_active_indices_equal_predict_mask(qtype):
    rng = np.random.default_rng(3)
    w = _weights(ranks=(32, 64, 16))
    p = PredictorSet(w, qtype=qtype, n_batch=4)
    x = rng.standard_normal((9, N_EMBD)).astype(np.float32)  # more tokens than n_batch: scratch grows
    for layer in range(N_LAYER):
        mask = np.zeros((9, N_FF), bool)
        p.predict_mask(layer, x, mask)
        assert 0 < mask.sum() < mask.size
        for t in range(9):
            idx = p.active_indices(layer, x[t])
            assert idx.dtype == np.int32 and np.array_equal(idx, np.flatnonzero(mask[t]))


@pytest.mark.parametrize("qtype, tol", [("f16", 1e-3), ("q8_0", 0.05), ("q4_0", 0.25)])
def test_logits_match_numpy(qtype, tol):
    w = _weights(ranks=(32, 64, 96))
    p = PredictorSet(w, qtype=qtype)
    x = np.random.default_rng(4).standard_normal((3, N_EMBD)).astype(np.float32)
    for layer in range(N_LAYER):
        ref = np.maximum(x @ w.fc1[layer].astype(np.float32).T, 0) @ w.fc2[layer].astype(np.float32).T
        np.testing.assert_allclose(p.logits(layer, x), ref, atol=tol * np.abs(ref).max())
    # Q8_0 / Q4_0 need rank in whole blocks of 32; other matrices stay F16
    assert {q.name for L in p.layers for q, _ in (L.fc1, L.fc2)} == {qtype.upper()}


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantised_predictor_keeps_odd_ranks_f16(qtype):
    p = PredictorSet(_weights(ranks=(16, 16, 16)), qtype=qtype)
    assert p.layers[0].fc1[0] == GGMLQuantizationType[qtype.upper()]
    assert p.layers[0].fc2[0] == GGMLQuantizationType.F16
    _one_line_error(lambda: PredictorSet(_weights(), qtype="q5_0"), "q5_0")


# ---- statistics --------------------------------------------------------------------------------

def test_stats_definitions():
    s = SparsityStats(2, 4)
    true = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    pred = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], bool)
    s.add(0, true, pred)
    s.add(1, np.zeros((1, 4), bool), np.zeros((1, 4), bool))  # nothing active, nothing predicted
    l0, l1 = s.layers()
    assert l0["true_sparsity"] == 1 - 2 / 8 and l0["predicted_sparsity"] == 1 - 3 / 8
    assert l0["recall"] == 1 / 2 and l0["precision"] == 1 / 3
    assert l1["recall"] == 1.0 and l1["precision"] == 1.0 and l1["true_sparsity"] == 1.0
    o = s.overall()
    assert o["tokens"] == 3 and o["recall"] == 1 / 2 and o["true_sparsity"] == 1 - 2 / 12
    assert s.minimum()["recall"] == 0.5
    md = s.markdown()
    assert "| all (micro) |" in md and "| min over layers |" in md and "recall" in md


# ---- engine wrappers on a small random ReLU model ----------------------------------------------

@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    from make_gguf import write_llama_gguf
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "relu.gguf", n_layer=2, n_embd=64, n_ff=128)


def test_fingerprint_ignores_quant_type(tmp_path):
    from make_gguf import write_llama_gguf

    from hybridinfer.gguf_file import GGUFFile
    from hybridinfer.loader import ModelArgs
    from hybridinfer.loader import model_fingerprint
    fps = []
    for q in (GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0):
        g = GGUFFile(write_llama_gguf(tmp_path / f"{q.name}.gguf", qtype=q))
        fps.append(model_fingerprint(g, ModelArgs.from_metadata(g.metadata)))
    g = GGUFFile(write_llama_gguf(tmp_path / "wide.gguf", n_ff=256))
    assert fps[0] == fps[1] != model_fingerprint(g, ModelArgs.from_metadata(g.metadata))


def test_recording_ffn_records_true_set(relu_model):
    from hybridinfer.model import load_model
    from hybridinfer.ffn import ActiveSet
    from hybridinfer.predictors.collect import RecordingFFN
    _, model = load_model(relu_model, 32)
    tokens = np.arange(3, 20)
    dense = model.forward(tokens, 0, all_logits=True).copy()
    rec = RecordingFFN(model.ffn, model.args, model.n_batch, ActiveSet(model.args.ffn_act))
    seen = {}
    rec.sink = lambda layer, resid, mask: seen.setdefault(layer, (resid.copy(), mask.copy()))
    model.ffn = rec
    assert np.array_equal(model.forward(tokens, 0, all_logits=True), dense)  # outputs unchanged
    blk = model.w.blk[1]
    resid, mask = seen[1]
    from hybridinfer.kernels.ops import rms_norm
    xn = np.empty_like(resid)
    rms_norm(resid, blk.ffn_norm, model.eps, xn)
    gate = np.empty((len(xn), model.args.n_ff), np.float32)
    blk.ffn_gate(xn, gate)
    assert np.array_equal(mask, gate > 0) and 0 < mask.mean() < 1


def test_masked_ffn_with_all_active_predictor_is_dense(relu_model):
    from hybridinfer.model import load_model
    from hybridinfer.predictors.evaluate import MaskedFFN
    _, model = load_model(relu_model, 32)
    tokens = np.arange(3, 25)
    dense = model.forward(tokens, 0, all_logits=True).copy()
    a = model.args
    model.ffn = MaskedFFN(a, PredictorSet.all_active(a.n_layer, a.n_embd, a.n_ff), model.n_batch)
    assert np.array_equal(model.forward(tokens, 0, all_logits=True), dense)
    o = model.ffn.stats.overall()
    assert o["recall"] == 1.0 and o["predicted_sparsity"] == 0.0 and 0 < o["true_sparsity"] < 1
    # a predictor that marks nothing active changes the output
    nothing = PredictorSet.from_arrays([np.zeros((1, a.n_embd))] * a.n_layer, [np.zeros((a.n_ff, 1))] * a.n_layer,
                                       [1.0] * a.n_layer)
    model.ffn = MaskedFFN(a, nothing, model.n_batch)
    assert not np.allclose(model.forward(tokens, 0, all_logits=True), dense)
    assert model.ffn.stats.overall()["recall"] == 0.0


def test_collect_refuses_silu(tmp_path):
    from make_gguf import write_llama_gguf

    from hybridinfer.errors import HybridInferError
    from hybridinfer.model import load_model
    from hybridinfer.ffn import ActiveSet
    from hybridinfer.predictors.collect import RecordingFFN
    _, model = load_model(write_llama_gguf(tmp_path / "silu.gguf", ffn_act=None), 32)
    with pytest.raises(HybridInferError, match="no exact zeros"):
        RecordingFFN(model.ffn, model.args, 4, ActiveSet(model.args.ffn_act))


def test_plan_chunks():
    from hybridinfer.predictors.collect import plan_chunks
    a, b = list(range(1000)), list(range(300))
    # budget split evenly, files interleaved, chunks of n_ctx with room for BOS
    assert plan_chunks([a, b], 1024, 256, bos_id=1) == [(0, 0, 256), (1, 0, 256), (0, 255, 256), (0, 510, 256)]
    assert plan_chunks([a, b], 100, 256, bos_id=1) == [(0, 0, 100)]  # budget below one chunk
    assert plan_chunks([a[:10], b[:30]], 1000, 256, bos_id=None) == [(1, 0, 30)]  # text below one chunk
    assert plan_chunks([[], [5]], 1000, 256, bos_id=None) == []


def test_collect_writes_memmaps(relu_model, tmp_path):
    from hybridinfer.model import load_model
    from hybridinfer.tokenizer import Tokenizer
    from hybridinfer.predictors.collect import Collection, collect
    gguf, model = load_model(relu_model, 32)
    text = tmp_path / "t.txt"
    text.write_text("the a and then there in her " * 40)
    col = collect(model, Tokenizer.from_metadata(gguf.metadata), [text], 100, tmp_path / "w", progress=False)
    assert col.n_tokens == 96 and [c.length for c in col.chunks] == [32, 32, 32]
    again = Collection.open(tmp_path / "w")
    assert again.chunks == col.chunks and again.n_tokens == 96
    resid, mask = again.resid(1), again.mask(1)
    assert resid.shape == (96, 64) and resid.dtype == np.float16 and mask.shape == (96, 16)
    active = again.unpack_mask(mask[:])
    assert active.shape == (96, 128) and 0 < active.mean() < 1 and np.abs(resid).max() > 0

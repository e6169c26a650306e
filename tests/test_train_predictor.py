"""tools/train_predictor.py end to end on a small random ReLU model, and its one-line option errors."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from make_gguf import PIECES, write_llama_gguf  # noqa: E402
from train_predictor import main  # noqa: E402  (tools/ is on sys.path, see conftest.py)

from hybridinfer.gguf_file import GGUFFile  # noqa: E402
from hybridinfer.loader import ModelArgs  # noqa: E402
from hybridinfer.loader import model_fingerprint  # noqa: E402
from hybridinfer.predictors.format import CONFIG, WEIGHTS, load  # noqa: E402
from hybridinfer.predictors.mlp import PredictorSet  # noqa: E402

N_FF = 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = write_llama_gguf(tmp / "relu.gguf", n_layer=2, n_embd=64, n_ff=N_FF, n_ctx=64)
    rng = np.random.default_rng(0)
    words = [p.replace("▁", "") or "x" for p in PIECES]
    texts = []
    for i in range(2):
        texts.append(tmp / f"text{i}.txt")
        texts[-1].write_text(" ".join(rng.choice(words, 1500)), encoding="utf-8")
    return tmp, model, texts


def _run(setup, out, *extra):
    tmp, model, texts = setup
    return main([str(model), "--data", *map(str, texts), "-o", str(out), "--rank", "16", "--tokens", "1024",
                 "--epochs", "2", "-t", "1", "-q", *extra])


def test_end_to_end(setup, capsys):
    tmp, model, texts = setup
    out = tmp / "pred"
    assert _run(setup, out) == 0
    printed = capsys.readouterr().out
    assert "| layer | tokens | true sparsity | predicted sparsity | recall | precision |" in printed
    assert "| all (micro) |" in printed and "| min over layers |" in printed
    config = json.loads((out / CONFIG).read_text())
    assert (out / WEIGHTS).is_file()
    g = GGUFFile(model)
    fp = model_fingerprint(g, ModelArgs.from_metadata(g.metadata))
    assert config["fingerprint"] == fp.as_dict()
    assert [layer["rank"] for layer in config["layers"]] == [16, 16]
    t = config["training"]
    assert t["epochs"] == 2 and t["seed"] == 0 and t["target_recall"] == 0.95 and t["tokens"] == 1024
    assert t["data"] == [str(p) for p in texts] and t["seconds"] > 0
    assert t["train_tokens"] + t["calibration_tokens"] + t["validation_tokens"] == 1024
    assert t["validation_tokens"] > 0 and t["calibration_tokens"] > 0
    v = config["validation"]
    assert len(v["layers"]) == 2
    for row in v["layers"] + [v["overall"], v["min"]]:
        for key in ("true_sparsity", "predicted_sparsity", "recall", "precision"):
            assert 0.0 <= row[key] <= 1.0
    assert v["layers"][0]["tokens"] == t["validation_tokens"]
    assert 0.0 < v["overall"]["true_sparsity"] < 1.0 and v["overall"]["recall"] > 0.5
    # the directory loads for this model and runs
    p = PredictorSet.load(out, fp)
    assert p.active_indices(1, np.ones(64, np.float32)).dtype == np.int32


def test_deterministic_and_reuses_collection(setup, capsys):
    tmp, _, _ = setup
    work = tmp / "work"
    assert _run(setup, tmp / "a", "--work-dir", str(work)) == 0
    assert _run(setup, tmp / "b", "--work-dir", str(work)) == 0
    assert (tmp / "a" / WEIGHTS).read_bytes() == (tmp / "b" / WEIGHTS).read_bytes()
    a, b = load(tmp / "a"), load(tmp / "b")
    assert a.thresholds == b.thresholds and a.info["validation"] == b.info["validation"]


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank"),
    (["--rank", str(N_FF + 1)], "n_ff = 128"),
    (["--target-recall", "1.5"], "--target-recall"),
    (["--target-recall", "0"], "--target-recall"),
    (["--epochs", "x"], "--epochs"),
    (["--tokens", "64"], "at least 3"),
    (["-c", "1000"], "-c 1000"),
    (["--ffn-act", "gelu"], "unknown FFN activation"),
    (["--ffn-act", "silu"], "no exact zeros"),
])
def test_bad_options(setup, capsys, args, message):
    tmp, _, _ = setup
    with pytest.raises(SystemExit) as e:
        _run(setup, tmp / "bad", *args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_inputs(setup, capsys):
    tmp, model, texts = setup
    for argv in ([str(tmp / "none.gguf"), "--data", str(texts[0]), "-o", str(tmp / "x")],
                 [str(model), "--data", str(tmp / "none.txt"), "-o", str(tmp / "x")],
                 [str(model), "--data", str(texts[0])]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        assert capsys.readouterr().err.count("\n") == 1


def _thresholds(setup, method):
    """CETT or TEAL thresholds for the setup's model run as SiLU (random)."""
    from hybridinfer.loader import FFNActivation
    from hybridinfer.predictors.thresholds import TEAL_MATRICES, Thresholds, save
    tmp, model, _ = setup
    g = GGUFFile(model)
    fp = model_fingerprint(g, ModelArgs.from_metadata(g.metadata, FFNActivation("silu")))
    rng = np.random.default_rng(1)
    layers = [{"ffn_act": (0.1 * rng.random(N_FF)).astype(np.float32)} if method == "cett" else
              {name: np.array([0.1], np.float32) for name in TEAL_MATRICES} for _ in range(2)]
    save(tmp / method, Thresholds(method, fp, layers))
    return tmp / method


def test_trains_for_cett_sets_of_a_silu_model(setup):
    """--thresholds: the predictor learns the CETT set of a SiLU model, and its table measures against it."""
    tmp, _, _ = setup
    out = tmp / "cett-pred"
    assert _run(setup, out, "--ffn-act", "silu", "--thresholds", str(_thresholds(setup, "cett"))) == 0
    config = json.loads((out / CONFIG).read_text())
    assert config["training"]["ffn_act"] == "silu" and config["training"]["thresholds"].endswith("cett")
    v = config["validation"]["overall"]
    assert 0.05 < v["true_sparsity"] < 0.95 and v["recall"] > 0.5


def test_refuses_teal_thresholds(setup, capsys):
    tmp, _, _ = setup
    with pytest.raises(SystemExit) as e:
        _run(setup, tmp / "bad", "--ffn-act", "silu", "--thresholds", str(_thresholds(setup, "teal")))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "teal thresholds" in err, err

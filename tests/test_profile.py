"""Activation statistics: `hybridinfer profile`, our stats file, PowerInfer's activation folders."""

import sys

import numpy as np
import pytest

from hybridinfer import cli
from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_STATS
from hybridinfer.model import load_model
from hybridinfer.loader import model_fingerprint
from hybridinfer.predictors import activity
from hybridinfer.predictors.activity import ActivationStats, StatsError
from hybridinfer.predictors.collect import collect, profile
from hybridinfer.predictors.format import Fingerprint
from hybridinfer.tokenizer import Tokenizer

TEXT = "And it came to pass, when the king of Israel saw the LORD, that he spake unto Moses. " * 20


@pytest.fixture(scope="module")
def tiny():
    gguf, model = load_model(DEFAULT_MODEL, n_ctx=64)
    return gguf, model, Tokenizer.from_metadata(gguf.metadata)


def test_counts_are_the_collected_active_sets(tiny, tmp_path):
    """profile counts, per neuron, exactly the tokens collect records as truly active."""
    gguf, model, tok = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    stats = profile(model, tok, [text], 200, model_fingerprint(gguf, model.args), progress=False)
    col = collect(model, tok, [text], 200, tmp_path / "work", progress=False)
    assert stats.tokens == col.n_tokens == 192  # three chunks of 64
    for layer in range(model.args.n_layer):
        mask = col.unpack_mask(np.asarray(col.mask(layer)))
        assert np.array_equal(stats.counts[layer], mask.sum(axis=0))
        sparsity = stats.rows()[layer]["true_sparsity"]
        assert sparsity == pytest.approx(1 - mask.mean())


def test_hot_shares():
    stats = ActivationStats([np.array([10, 0, 0, 0]), np.array([1, 1, 1, 1]), np.zeros(4, np.int64)], 10, None)
    assert stats.hot_shares(0) == [0.25, 0.25, 0.25]
    assert stats.hot_shares(1) == [0.5, 1.0, 1.0]  # 3 of 4 carry 75%, short of 80%
    assert stats.hot_shares(2) == [0.0, 0.0, 0.0]


def fingerprint(n_layer=2, n_ff=4, layout="a" * 64) -> Fingerprint:
    return Fingerprint("llama", n_layer, 8, n_ff, layout)


def test_round_trip_and_another_model_refused(tmp_path):
    stats = ActivationStats([np.array([3, 0, 1, 2]), np.array([0, 0, 0, 5])], 5, fingerprint())
    stats.save(tmp_path / "s.safetensors")
    back = activity.load(tmp_path / "s.safetensors", fingerprint())
    assert back.tokens == 5 and all(np.array_equal(a, b) for a, b in zip(back.counts, stats.counts))
    with pytest.raises(StatsError, match="another model"):
        activity.load(tmp_path / "s.safetensors", fingerprint(layout="b" * 64))


@pytest.mark.parametrize("edit, words", [
    (lambda t, m: t.pop("blk.1.counts"), "lacks layer 1"),
    (lambda t, m: t.__setitem__("blk.0.counts", np.array([-1, 0, 0, 0])), "outside"),
    (lambda t, m: t.__setitem__("blk.0.counts", np.array([9, 0, 0, 0])), "outside"),  # more than the tokens
    (lambda t, m: t.__setitem__("blk.0.counts", np.array([1, 0, 0])), "shape"),
    (lambda t, m: t.__setitem__("blk.0.counts", np.array([1.0, 0, 0, 0])), "expected I64"),
    (lambda t, m: m.__setitem__("tokens", "many"), "tokens"),
    (lambda t, m: m.__setitem__("format", "other"), "not a hybridinfer activation-statistics file"),
])
def test_damaged_stats_refused(tmp_path, edit, words):
    from safetensors.numpy import save_file
    tensors = {"blk.0.counts": np.array([3, 0, 1, 2]), "blk.1.counts": np.array([0, 0, 0, 5])}
    meta = {"format": activity.FORMAT, "format_version": "1", "tokens": "5",
            "fingerprint": '{"architecture": "llama", "n_layer": 2, "n_embd": 8, "n_ff": 4, "layout_sha256": "x"}'}
    edit(tensors, meta)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(StatsError, match=words):
        activity.load(tmp_path / "s.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 20)
    with pytest.raises(StatsError, match="cannot read"):
        activity.load(tmp_path / "junk")


def test_powerinfer_folder(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "activation"
    folder.mkdir()
    for i in range(3):
        torch.save(torch.tensor([5.0, 0.0, 2.0, 1.0]) * (i + 1), folder / f"activation_{i}.pt")
    stats = activity.load(tmp_path, fingerprint(n_layer=3))  # the folder above activation/ works too
    assert stats.source == "powerinfer" and stats.tokens is None and stats.n_layer == 3
    assert stats.counts[2].tolist() == [15, 0, 6, 3]
    assert "| ? | ? |" in stats.markdown()
    with pytest.raises(StatsError, match="has 3 layers, the model has 2"):
        activity.load(folder, fingerprint(n_layer=2))
    (folder / "activation_1.pt").unlink()
    with pytest.raises(StatsError, match="lacks activation_1.pt"):
        activity.load(folder)
    torch.save({"not": "a tensor"}, folder / "activation_1.pt")
    with pytest.raises(StatsError, match="1-D tensor"):
        activity.load(folder)


def test_profile_command_table_and_plot(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    pytest.importorskip("matplotlib")
    status = cli.main(["profile", "--data", str(text), "--tokens", "300", "-c", "100", "-o",
                       str(tmp_path / "s.safetensors"), "--plot", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    assert status == 0 and "| 5 | 300 |" in out and "neurons for 95%" in out
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert activity.load(tmp_path / "s.safetensors").tokens == 300


def test_profile_command_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed
    assert cli.main(["profile", "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "s"),
                     "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install 'hybridinfer[plot]'" in capsys.readouterr().err
    assert cli.main(["profile", "--data", str(tmp_path / "none.txt"), "-o", str(tmp_path / "s")]) == 1
    assert "cannot read text file" in capsys.readouterr().err
    assert cli.main(["profile", "--ffn-act", "silu", "--data", str(tmp_path), "-o", str(tmp_path / "s")]) == 1
    assert "no exact zeros" in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert cli.main(["profile", "--data", str(text), "--tokens", "64", "-o", str(tmp_path)]) == 1  # a directory
    assert capsys.readouterr().err == f"error: -o '{tmp_path}' is a directory: give the statistics file's name\n"


def test_shipped_stats_belong_to_the_default_model(tiny):
    gguf, model, _ = tiny
    stats = activity.load(DEFAULT_STATS, model_fingerprint(gguf, model.args))
    assert stats.n_layer == 6 and stats.n_ff == 1024 and stats.tokens == 65536
    rows = stats.rows()
    assert all(0.5 < r["true_sparsity"] < 0.95 for r in rows)  # ReLU: most neurons are zero for a token
    assert all(r["neurons_for_50pct"] < 0.5 for r in rows)  # and some fire far more often than others

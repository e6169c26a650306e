"""The sparse GGUF (hybridinfer convert) and PowerInfer's: loading maps and copies nothing, results
equal the unconverted model's with the same predictor (bit for bit, or the same tokens when neurons
are stored hottest first), and bad input ends in one line with no partial file left behind."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from hybridinfer import cli, sparse_gguf
from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR, DEFAULT_STATS
from hybridinfer.ffn import PredictedFFN
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import ModelArgs, load_weights, model_fingerprint, neuron_major
from hybridinfer.model import N_BATCH, Transformer
from hybridinfer.predictors import PredictorSet, load, save
from make_gguf import write_llama_gguf


def convert(tmp_path, name, *args):
    out = tmp_path / name
    assert cli.main(["convert", *args, "-o", str(out)]) == 0
    return out


def model_of(path, predictor=None):
    """The model with predicted mode over predictor (default: the file's own)."""
    gguf = GGUFFile(path)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    predictor = predictor or sparse_gguf.predictor(gguf, args)
    return gguf, Transformer(args, weights, 64, PredictedFFN(args, N_BATCH, weights.blk, predictor))


TOKENS = np.array([1, 450, 1020, 77, 3000, 12, 900, 31])


def logits(model, tokens=TOKENS):
    """A prefill of 4 tokens, then decode steps: every logit of both paths."""
    first = model.forward(tokens[:4], 0, all_logits=True).copy()
    return np.concatenate([first] + [model.forward(tokens[i:i + 1], i).copy() for i in range(4, len(tokens))])


@pytest.fixture(scope="module")
def plain():
    fp = model_fingerprint(GGUFFile(DEFAULT_MODEL), ModelArgs.from_metadata(GGUFFile(DEFAULT_MODEL).metadata))
    return logits(model_of(DEFAULT_MODEL, PredictorSet.load(DEFAULT_PREDICTOR, fp))[1])


def test_converted_file_maps_its_layout_and_gives_the_same_logits(tmp_path, plain, capsys):
    path = convert(tmp_path, "sparse.gguf")
    assert "gate/up interleaved, ffn_down neuron-major (Q8_0), predictor (f16)" in capsys.readouterr().err
    gguf, model = model_of(path)
    mapped = np.frombuffer(gguf._map, np.uint8)
    ffn = model.ffn
    for layer in (0, 5):  # the sparse path reads the file's tensors in place: nothing copied at load
        for m in (ffn.gate_up[layer], ffn.down_t[layer]):
            assert np.shares_memory(m.data, mapped)
        assert np.shares_memory(ffn.predictor.layers[layer].fc2[1], mapped)
    assert "blk.0.ffn_gate.weight" not in gguf.tensors and "blk.0.ffn_down.weight" not in gguf.tensors
    np.testing.assert_array_equal(logits(model), plain)


def test_down_type_chosen(tmp_path, plain, capsys):
    """--down-type q4_0: ffn_down_t in Q4_0 (a second, 4-bit rounding of the Q8_0 file's ffn_down), the
    same tokens, logits within 5% of their range; a type it cannot write is refused by argparse."""
    path = convert(tmp_path, "q4.gguf", "--down-type", "Q4_0")
    assert "ffn_down neuron-major (Q4_0)" in capsys.readouterr().err
    gguf, model = model_of(path)
    assert all(gguf.tensors[f"blk.{i}.ffn_down_t.weight"].qtype == Q.Q4_0 for i in range(model.args.n_layer))
    got = logits(model)
    assert (got.argmax(-1) == plain.argmax(-1)).all()
    assert 0 < np.abs(got - plain).max() < 0.05 * np.abs(plain).max()
    with pytest.raises(SystemExit):
        cli.main(["convert", "--down-type", "q6_k", "-o", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()


def test_hottest_first_gives_the_same_tokens(tmp_path, plain):
    path = convert(tmp_path, "perm.gguf", "--profile", str(DEFAULT_STATS))
    gguf, model = model_of(path)
    got = logits(model)
    # the same tokens; the logits differ by the order of the down sums (summed neuron by neuron),
    # and a rounding difference can flip a step of the 8-bit grid the kernels round each input to
    assert (got.argmax(-1) == plain.argmax(-1)).all()
    assert np.abs(got - plain).max() < 0.02 * np.abs(plain).max()
    counts = sparse_gguf.profile(gguf, model.args).counts[2]
    assert np.all(np.diff(counts) <= 0)  # stored hottest first, with the profile


def test_commands_on_a_converted_file(tmp_path):
    path = convert(tmp_path, "perm.gguf", "--profile", str(DEFAULT_STATS), "--predictor-type", "q4_0")
    texts = set()
    for extra in ([], ["--sparse", "off"], ["--sparse", "exact"], ["--predictor", str(DEFAULT_PREDICTOR)],
                  ["--vram-budget", "0.002", "--device", "cpu"]):
        result = subprocess.run([sys.executable, "-m", "hybridinfer.cli", "run", "-m", str(path), "-p",
                                 "And it came to pass", "-n", "12", "--temp", "0", "--json", *extra],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        texts.add(json.loads(result.stdout)["text"])
    assert len(texts) == 1, texts  # dense, exact, the file's predictor, the directory's, split: one text


def test_another_models_predictor_or_profile_refused(tmp_path, capsys):
    other = write_llama_gguf(tmp_path / "other.gguf", n_embd=64, n_ff=128)
    assert cli.main(["convert", str(other), "--predictor", str(DEFAULT_PREDICTOR), "-o", str(tmp_path / "o")]) == 1
    assert "made for another model" in capsys.readouterr().err
    assert cli.main(["convert", str(other), "--profile", str(DEFAULT_STATS), "-o", str(tmp_path / "o")]) == 1
    assert "profile this model" in capsys.readouterr().err
    path = convert(tmp_path, "sparse.gguf")
    capsys.readouterr()
    other_predictor = tmp_path / "p"
    weights = load(DEFAULT_PREDICTOR)  # the same sizes, another model's tensors
    weights.fingerprint = dataclasses.replace(weights.fingerprint, layout_sha256="0" * 64)
    save(other_predictor, weights)
    assert cli.main(["run", "-m", str(path), "-n", "1", "--predictor", str(other_predictor)]) == 1
    assert "made for another model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated", "not llama", "same path", "already sparse"])
def test_bad_input_leaves_no_file(tmp_path, capsys, damage):
    src = tmp_path / "in.gguf"
    out = tmp_path / "out.gguf"
    if damage == "truncated":
        src.write_bytes(DEFAULT_MODEL.read_bytes()[:5_000_000])
    elif damage == "not llama":
        write_llama_gguf(src, arch="gpt2")
    elif damage == "same path":
        src.write_bytes(DEFAULT_MODEL.read_bytes())
        out = src
    else:
        src = convert(tmp_path, "in.gguf")
    capsys.readouterr()
    assert cli.main(["convert", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gguf"]


def test_full_disk_leaves_no_file(tmp_path):
    """A file-size limit stands in for a full disk: the write fails, one line, nothing left behind."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000)); "
            "from hybridinfer.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "convert", "-o", str(tmp_path / "out.gguf")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error: cannot write"), \
        result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def write_powerinfer_gguf(plain, out, predictor: PredictorSet, threshold: float):
    """plain's model as PowerInfer's converter lays it out: ffn_down_t for ffn_down, the predictor as
    blk.N.fc1 / fc2 (F16), powerinfer.sparse_threshold, the magic PWRI."""
    gguf = GGUFFile(plain)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    w = GGUFWriter(str(out), "llama")
    sparse_gguf.copy_metadata(plain, w)
    w.add_float32("powerinfer.sparse_threshold", threshold)
    for name, t in gguf.tensors.items():
        if name.endswith("ffn_down.weight"):
            i = int(name.split(".")[1])
            down_t = neuron_major(weights.blk[i].ffn_down)
            w.add_tensor(f"blk.{i}.ffn_down_t.weight", down_t.data, raw_dtype=down_t.qtype)
            for fc, (qtype, blocks) in (("fc1", predictor.layers[i].fc1), ("fc2", predictor.layers[i].fc2)):
                w.add_tensor(f"blk.{i}.{fc}.weight", blocks, raw_dtype=qtype)
        else:
            w.add_tensor(name, t.data.reshape(*reversed(t.shape[1:]), -1), raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(out, "r+b") as f:
        f.write(b"PWRI")


def test_powerinfer_gguf_equals_the_plain_file(tmp_path):
    plain = write_llama_gguf(tmp_path / "plain.gguf", qtype=Q.F16, n_embd=64, n_ff=128)
    rng = np.random.default_rng(0)
    predictor = PredictorSet.from_arrays([rng.standard_normal((16, 64)) for _ in range(2)],
                                         [rng.standard_normal((128, 16)) for _ in range(2)], [1.5, 1.5])
    pwri = tmp_path / "pwri.gguf"
    write_powerinfer_gguf(plain, pwri, predictor, 1.5)
    gguf, model = model_of(pwri)
    assert gguf.powerinfer and model.ffn.predictor.thresholds == [1.5, 1.5]
    assert model_fingerprint(gguf, model.args) == model_fingerprint(GGUFFile(plain), model.args)
    tokens = TOKENS % 200 + 3
    np.testing.assert_array_equal(logits(model, tokens), logits(model_of(plain, predictor)[1], tokens))


def test_damaged_permutation_refused(tmp_path, capsys):
    """A stored order that is no permutation would misplace another model file's predictor rows."""
    path = convert(tmp_path, "perm.gguf", "--profile", str(DEFAULT_STATS))
    gguf = GGUFFile(path)
    start = gguf.tensors["blk.1.ffn_perm"].data.ctypes.data - np.frombuffer(gguf._map, np.uint8).ctypes.data
    del gguf
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.array([-1], np.int32).tobytes())
    capsys.readouterr()
    assert cli.main(["run", "-m", str(path), "-n", "1", "--predictor", str(DEFAULT_PREDICTOR)]) == 1
    assert "blk.1.ffn_perm is not a permutation" in capsys.readouterr().err

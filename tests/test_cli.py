"""The command line: generation, JSON output, and a one-line error for every kind of bad input."""

import json
import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType as Q

from hybridinfer.commands.common import DEFAULT_PREDICTOR
from make_gguf import write_llama_gguf


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridinfer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Every error, of arguments or of input, has one form: one 'error:' line, exit status 1."""
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_run_default_model_greedy_json():
    result = cli("run", "-p", "And it came to pass, when the king", "-n", "20", "--temp", "0", "--sparse", "exact",
                 "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["text"].startswith(" of Israel saw that the king of Israel")
    assert out["generated_tokens"] == len(out["ids"]) == 20
    assert out["prompt_ids"][0] == 1  # BOS, as the file's add_bos_token says


def test_run_streams_text_and_prints_timings(tiny_q8):
    result = cli("run", "-m", str(tiny_q8), "-p", "The LORD", "-n", "8", "--seed", "3", "-t", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The LORD")
    assert "prompt eval time" in result.stderr and "tokens per second" in result.stderr


def test_same_seed_same_text(tiny_q8):
    runs = [json.loads(cli("run", str(tiny_q8), "-n", "12", "--seed", "7", "--json").stdout)["ids"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_perplexity_json(tiny_q8):
    result = cli("perplexity", "-m", str(tiny_q8), "-f", str(tiny_q8.parent / "val.txt"), "-c", "128",
                 "--chunks", "3", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["n_chunks"] == 3 and 10 < out["ppl"] < 200


def test_bench_table(tiny_q8):
    result = cli("bench", str(tiny_q8), "-p", "16", "-n", "4", "-r", "2")
    assert result.returncode == 0, result.stderr
    assert "| pp16 |" in result.stdout and "| tg4 |" in result.stdout


def test_bench_vs_dense(tiny_q8):
    """--vs-dense times dense mode on the same weights in the same run and gives the ratio."""
    result = cli("bench", str(tiny_q8), "-p", "0", "-n", "4", "-r", "2", "--sparse", "exact", "--vs-dense", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    rates = {r["engine"]: r["tokens_per_s"] for r in out["results"]}
    assert set(rates) == {"hybridinfer exact", "hybridinfer dense"}
    assert out["ratio_vs_dense"]["tg4"] == pytest.approx(rates["hybridinfer exact"] / rates["hybridinfer dense"])


def test_bench_reports_the_predicted_share(tiny_q8):
    """Predicted mode's speed comes with the share of neurons it computed; other modes have none."""
    result = cli("bench", "-p", "0", "-n", "4", "-r", "1", "--json")  # the default model: its predictor
    assert result.returncode == 0, result.stderr
    assert 0.0 < json.loads(result.stdout)["predicted_active_share"] < 1.0
    result = cli("bench", "-p", "0", "-n", "4", "-r", "1")
    assert "% of FFN neurons active" in result.stderr
    result = cli("bench", str(tiny_q8), "-p", "0", "-n", "4", "-r", "1", "--sparse", "exact")
    assert result.returncode == 0 and "neurons active" not in result.stderr


def test_chat_without_template_is_refused(tiny_q8):
    assert_one_line_error(cli("run", str(tiny_q8), "--chat", "-n", "1"), "chat_template")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_q8):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.gguf").write_text("hello, not a model")
    data = tiny_q8.read_bytes()
    (d / "truncated.gguf").write_bytes(data[:len(data) // 2])
    (d / "header.gguf").write_bytes(data[:200])
    write_llama_gguf(d / "gpt.gguf", arch="gpt2")
    write_llama_gguf(d / "q8_1.gguf", qtype=Q.Q8_1)
    write_llama_gguf(d / "incomplete.gguf", drop_tensor="blk.1.ffn_up.weight")
    return d


@pytest.mark.parametrize("name, words", [
    ("missing.gguf", ["not found"]),
    ("text.gguf", ["not a GGUF file"]),
    ("truncated.gguf", ["truncated"]),
    ("header.gguf", ["truncated"]),
    ("gpt.gguf", ["architecture 'gpt2'"]),
    ("q8_1.gguf", ["Q8_1"]),
    ("incomplete.gguf", ["blk.1.ffn_up.weight"]),
])
def test_bad_model_files(bad_files, name, words):
    assert_one_line_error(cli("run", str(bad_files / name), "-n", "1"), *words)


@pytest.mark.parametrize("args, words", [
    (["-n", "-2"], ["-n", "out of range"]),
    (["-n", "many"], ["-n", "not a whole number"]),
    (["-c", "-1"], ["-c", "out of range"]),
    (["-c", "100000"], ["-c 100000", "out of range"]),
    (["--ffn-act", "gelu"], ["gelu"]),
    (["--ffn-act", "fatrelu"], ["fatrelu"]),
    (["--top-p", "0"], ["--top-p"]),
    (["-p", "word " * 300], ["longer than the context"]),
    (["-c", "8", "-p", "a b c d e f g h i j"], ["longer than the context"]),
    (["-t", "4096"], ["-t", "cores"]),
    (["--ffn-act", "fatrelu:inf"], ["finite"]),
    (["--ffn-act", "fatrelu:nan"], ["finite"]),
    (["-p", b"The \xff LORD"], ["not valid UTF-8"]),
])
def test_bad_arguments(args, words):
    assert_one_line_error(cli("run", *args), *words)


def test_error_after_the_echoed_prompt_starts_its_own_line():
    result = cli("run", "-p", "word " * 300)
    assert result.stdout.endswith("word \n") and result.stderr.startswith("error: ")


def test_tiny_repeat_penalty_still_samples():
    result = cli("run", "--repeat-penalty", "1e-300", "-n", "8", "--seed", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generated_tokens"] == 8


def test_ctrl_c_prints_the_timings_so_far(monkeypatch, capsys):
    """Ctrl-C while generating ends as llama.cpp ends: the text so far, its timings, exit status 130."""
    from hybridinfer import cli as entry
    from hybridinfer.sampling import Sampler

    class InterruptedAtTheFifthToken(Sampler):
        def __call__(self, logits):
            if len(self.recent) == 10 + 4:  # the default prompt's 10 tokens and 4 generated
                raise KeyboardInterrupt
            return super().__call__(logits)

    monkeypatch.setattr("hybridinfer.commands.run.Sampler", InterruptedAtTheFifthToken)
    assert entry.main(["run", "-n", "20", "--temp", "0", "-t", "1"]) == 130
    err = capsys.readouterr().err
    assert "eval time" in err and "/     3 runs" in err and "stopped by interrupted" in err
    assert entry.main(["run", "-n", "20", "--temp", "0", "-t", "1", "--json"]) == 130
    out = json.loads(capsys.readouterr().out)
    assert out["stopped_by"] == "interrupted" and out["generated_tokens"] == 4


@pytest.fixture(scope="module")
def silu_model(tmp_path_factory):
    return write_llama_gguf(tmp_path_factory.mktemp("silu") / "silu.gguf", ffn_act=None)


@pytest.fixture(scope="module")
def partial_predictor(tmp_path_factory):
    """The shipped predictor with one layer's weights left out."""
    import shutil
    from safetensors.numpy import load_file, save_file
    d = tmp_path_factory.mktemp("pred") / "partial"
    shutil.copytree(DEFAULT_PREDICTOR, d)
    weights = next(d.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("blk.5.")}
    save_file(tensors, weights)
    return d


def test_run_default_model_uses_its_predictor_and_reports_stats():
    result = cli("run", "-n", "16", "--temp", "0", "--stats", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["sparse"] == "predicted"
    overall = out["stats"]["overall"]
    assert overall["recall"] > 0.9 and overall["predicted_sparsity"] > 0.5
    assert len(out["stats"]["layers"]) == 6


@pytest.mark.parametrize("args, words", [
    (["--sparse", "exact", "--predictor", "."], ["--predictor", "--sparse exact"]),
    (["--predictor", "/nonexistent/dir"], ["/nonexistent/dir"]),
])
def test_bad_sparse_options(args, words):
    assert_one_line_error(cli("run", "-n", "1", *args), *words)


def test_predicted_without_predictor_is_refused(tiny_q8):
    assert_one_line_error(cli("run", str(tiny_q8), "--sparse", "predicted", "-n", "1"), "needs a predictor")


def test_sparse_on_silu_model_is_refused(silu_model):
    assert_one_line_error(cli("run", str(silu_model), "--sparse", "exact", "-n", "1"), "silu", "--ffn-act")


def test_predictor_of_another_model_is_refused(silu_model):
    assert_one_line_error(cli("run", str(silu_model), "--ffn-act", "relu", "--predictor", str(DEFAULT_PREDICTOR),
                              "-n", "1"), "another model")


def test_partial_predictor_is_refused(tiny_q8, partial_predictor):
    assert_one_line_error(cli("run", str(tiny_q8), "--predictor", str(partial_predictor), "-n", "1"),
                          str(partial_predictor))

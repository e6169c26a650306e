"""Placement under a byte budget: never over it, hottest first, in whole groups, the two ends (nothing,
everything), and the command line's checks of --vram-budget, --profile and --device."""

import json
import subprocess
import sys

import numpy as np
import pytest

from hybridinfer import cli
from hybridinfer.commands.common import DEFAULT_STATS
from hybridinfer.placement import GROUP, place
from hybridinfer.predictors import activity
from hybridinfer.predictors.activity import ActivationStats
from hybridinfer.predictors.format import Fingerprint


def power_law_stats(n_layer=4, n_ff=1000, seed=0) -> ActivationStats:
    rng = np.random.default_rng(seed)
    return ActivationStats([(rng.pareto(1.2, n_ff) * 50).astype(np.int64) for _ in range(n_layer)], 10**6, None)


BYTES = [300, 300, 180, 300]  # per neuron: layers of different types


@pytest.mark.parametrize("budget", [0, 1, 299, 5000, 77_000, 160_000, 400_000, 10**7])
def test_budget_never_exceeded_and_hottest_first(budget):
    stats = power_law_stats()
    p = place(stats, BYTES, budget, scratch_bytes=4000)
    assert p.nbytes <= budget
    for counts, hot in zip(stats.counts, p.hot):
        assert len(hot) % GROUP == 0 or len(hot) == len(counts)  # whole groups
        cold = np.setdiff1d(np.arange(len(counts)), hot)
        if len(hot) and len(cold):  # each layer's fast neurons are its hottest
            assert counts[hot].min() >= counts[cold].max()
        assert np.all(np.diff(counts[hot]) <= 0)  # in order, hottest first
    served = sum(c[h].sum() for c, h in zip(stats.counts, p.hot)) / sum(c.sum() for c in stats.counts)
    assert p.share == pytest.approx(served)


def test_budget_goes_where_activations_per_byte_are_highest():
    stats = power_law_stats()
    p = place(stats, BYTES, 4000 + GROUP * 180, scratch_bytes=4000)  # room for one group of layer 2 alone
    assert [len(h) for h in p.hot] == [0, 0, GROUP, 0]
    dense = place(stats, BYTES, 4000 + 2 * GROUP * 300, scratch_bytes=4000)
    first = [c[np.argsort(-c, kind="stable")[:GROUP]].sum() / b for c, b in zip(stats.counts, BYTES)]
    taken = [i for i, h in enumerate(dense.hot) if len(h)]
    assert set(taken) <= set(np.argsort(first)[::-1][:2])


def test_ends_of_the_budget():
    stats = power_law_stats()
    empty = place(stats, BYTES, 0, scratch_bytes=4000)
    assert empty.nbytes == 0 and all(len(h) == 0 for h in empty.hot) and empty.share == 0
    everything = place(stats, BYTES, 10**9, scratch_bytes=4000)
    assert all(len(h) == 1000 for h in everything.hot) and everything.share == 1.0
    assert everything.cold_bytes == 0 and everything.nbytes == 4000 + 1000 * sum(BYTES)
    assert "expected share of activations on the cuda side 100.0%" in everything.describe("cuda")


def cli_main(capsys, *args):
    try:
        status = cli.main(list(args))
    except SystemExit as e:  # argument errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_run_prints_the_placement(capsys):
    status, out, err = cli_main(capsys, "run", "-n", "4", "--temp", "0", "--vram-budget", "0.001", "--device", "cpu",
                                "--stats", "--json")
    assert status == 0, err
    line = json.loads(out)["stats"]["placement"]
    # 816 bytes a neuron; the CPU side leaves attention where it is
    assert line.startswith("placement: cpu side 1.0 MiB of a 1.0 MiB budget (attention of 0 of 6 layers, 0.0 MiB; "
                           "1280 of 6144 FFN neurons")


@pytest.mark.parametrize("args, words", [
    (["--vram-budget", "-1"], ["--vram-budget", "out of range"]),
    (["--vram-budget", "lots"], ["--vram-budget", "not a number"]),
    (["--vram-budget", "nan"], ["--vram-budget"]),
    (["--device", "cpu"], ["--device is used with --vram-budget"]),
    (["--vram-budget", "1", "--sparse", "exact"], ["not --sparse exact"]),
    (["--vram-budget", "1", "--profile", "/nonexistent"], ["not found", "hybridinfer profile"]),
])
def test_bad_split_arguments(capsys, args, words):
    status, _, err = cli_main(capsys, "run", "-n", "1", *args)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


def test_stats_of_another_model_or_damaged_refused(tmp_path, capsys):
    shipped = activity.load(DEFAULT_STATS)
    other = ActivationStats(shipped.counts, shipped.tokens, Fingerprint.from_dict(
        {**shipped.fingerprint.as_dict(), "n_embd": shipped.fingerprint.n_embd * 2}, "test"))
    other.save(tmp_path / "other.safetensors")
    status, _, err = cli_main(capsys, "run", "-n", "1", "--vram-budget", "1", "--profile",
                              str(tmp_path / "other.safetensors"))
    assert status == 1 and "profile this model" in err, err
    folder = tmp_path / "activation"  # PowerInfer's layout with a layer missing
    folder.mkdir()
    torch = pytest.importorskip("torch")
    for i in (0, 2):
        torch.save(torch.ones(1024), folder / f"activation_{i}.pt")
    status, _, err = cli_main(capsys, "run", "-n", "1", "--vram-budget", "1", "--profile", str(tmp_path))
    assert status == 1 and "lacks activation_1.pt" in err, err
    torch.save(-torch.ones(1024), folder / "activation_1.pt")
    status, _, err = cli_main(capsys, "run", "-n", "1", "--vram-budget", "1", "--profile", str(tmp_path))
    assert status == 1 and "counts outside" in err, err


def cli_process(*args: str, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}from hybridinfer.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_device_cuda_without_a_gpu_or_the_extra(monkeypatch):
    import os
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    result = cli_process("run", "-n", "1", "--vram-budget", "0.01", "--device", "cuda", env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: --device cuda: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if "no CUDA GPU" not in result.stderr:
        pytest.skip("this machine has a GPU")
    result = cli_process("run", "-n", "1", "--vram-budget", "0.01", "--device", "cuda",
                         prelude="sys.modules['numba.cuda'] = None; ")  # as when numba-cuda is not installed
    assert result.returncode == 1 and "pip install 'hybridinfer[gpu]'" in result.stderr, result.stderr


@pytest.mark.parametrize("budget", [0, 999, 1000, 2500, 4100, 4000 + 4000 + GROUP * 180, 10**7])
def test_attention_first_layer_by_layer(budget):
    stats = power_law_stats()
    attention = [1000, 1000, 1000, 1000]
    p = place(stats, BYTES, budget, scratch_bytes=4000, layer_bytes=attention)
    assert p.nbytes <= budget
    assert p.layers == min(4, budget // 1000) and p.layer_bytes == 1000 * p.layers
    if any(len(h) for h in p.hot):  # neurons only once every layer's attention is in, with their scratch
        assert p.layers == 4 and p.scratch_bytes == 4000
    else:
        assert p.scratch_bytes == 0
    stopped = place(stats, BYTES, 10**7, scratch_bytes=4000, layer_bytes=[1000, None, 1000, 1000])
    assert stopped.layers == 1  # a layer whose attention cannot go there ends the run from the first


def test_whole_layers():
    stats = power_law_stats()
    per_layer = [1000 + 1000 * b for b in BYTES]
    budget = 4000 + per_layer[0] + per_layer[1] + 10
    p = place(stats, BYTES, budget, scratch_bytes=4000, layer_bytes=[1000] * 4, whole_layers=True)
    assert [len(h) for h in p.hot] == [1000, 1000, 0, 0] and p.layers == 2 and p.nbytes <= budget
    without_attention = place(stats, BYTES, budget, scratch_bytes=4000, whole_layers=True)
    assert [len(h) for h in without_attention.hot] == [1000, 1000, 0, 0] and without_attention.layers == 0


def test_budget_over_the_gpus_free_memory(capsys):
    from hybridinfer.kernels import cuda
    if cuda.available():
        pytest.skip(cuda.available())
    free = cuda.free_memory()  # in the simulator: the host's available memory
    status, _, err = cli_main(capsys, "run", "-n", "1", "--device", "cuda", "--vram-budget", str(2 * free / 2**30))
    assert status == 1 and "more than the GPU's free memory" in err and "GiB): give at most that" in err, err

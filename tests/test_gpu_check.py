"""tools/gpu_check.sh, run as far as a machine without a GPU allows: the install, the refusal with
one line where no GPU is visible, and the whole flow with the CPU as the fast side on the tiny model."""

import os
import shutil
import subprocess
from pathlib import Path

from hybridinfer.commands.common import DEFAULT_MODEL, DEFAULT_PREDICTOR, DEFAULT_STATS
from hybridinfer.kernels import cuda

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


def gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path), **env})


def test_without_a_gpu_it_stops_with_the_reason(tmp_path):
    result = gpu_check(tmp_path, NUMBA_ENABLE_CUDASIM="0")
    if "no CUDA GPU" not in result.stderr and cuda.available() is None:
        return  # a GPU machine: the check itself runs there
    assert result.returncode != 0
    assert "== " in result.stderr and "gpu_check: no CUDA GPU is visible" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_flow_with_the_cpu_as_fast_side(tmp_path):
    model = tmp_path / "tiny.gguf"
    shutil.copy(DEFAULT_MODEL, model)
    shutil.copytree(DEFAULT_PREDICTOR, tmp_path / "tiny.predictor")
    shutil.copy(DEFAULT_STATS, tmp_path / "tiny.stats.safetensors")
    result = gpu_check(tmp_path, MODEL=str(model), DEVICE="cpu", REPS="1", TOKENS="4")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "bench.md").read_text()
    for engine in ("hybridinfer predicted + hot on cpu", "hybridinfer dense", "hybridinfer predicted |"):
        assert engine in table, table
    assert "placement: cpu side" in result.stderr

"""The wheel installs one top-level package, hybridinfer: kernels/ and predictors/ go inside it,
since both names belong to other projects on PyPI (DESIGN.md)."""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_hybridinfer(tmp_path: Path):
    # built from a copy: setuptools leaves build/ behind, whose stale files a later wheel would pack
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(".git", "build", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("hybridinfer-*.whl")
    env = tmp_path / "env"
    venv.create(env)  # no pip of its own: the running pip installs into it
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    before = set(p.name for p in site.iterdir())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)],
                   check=True, capture_output=True)
    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"hybridinfer"}
    package = site / "hybridinfer"
    for module in ("kernels/__init__.py", "kernels/cpu.py", "predictors/__init__.py", "predictors/format.py",
                   "commands/run.py", "models/tiny-relu-llama.q8_0.gguf",
                   "models/tiny-relu-llama.predictor/predictor.safetensors",
                   "models/tiny-relu-llama.stats.safetensors"):
        assert (package / module).is_file(), module

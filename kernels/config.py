"""Numba settings for every CPU kernel, in one place.

KERNEL and SERIAL_KERNEL are for entry kernels (called from Python), cached on disk. HELPER is for
functions only called from other kernels: they are compiled into their callers and need no cache
of their own. drop_stale_cache (run when the package is imported) rebuilds the cache whenever a
kernels/*.py file changes.
"""

import hashlib
from pathlib import Path

# LLVM's "fast" minus nnan, ninf and afn: reassociation (vectorised sums) and fused multiply-adds,
# while -inf (softmax masks) and overflowing exp keep their IEEE meaning instead of becoming
# undefined. Results stay deterministic: each output element is computed by one thread in a fixed
# order, whatever the thread count.
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})
HELPER = dict(fastmath=set(FASTMATH), nogil=True, boundscheck=False, error_model="numpy")
SERIAL_KERNEL = dict(HELPER, cache=True)
KERNEL = dict(SERIAL_KERNEL, parallel=True)



_PURE_PYTHON = {"__init__.py", "reference.py"}  # no numba code: edits there keep the cache


def drop_stale_cache() -> None:
    """Delete numba's cached kernels in kernels/__pycache__ when a kernels/*.py file with numba
    code changed.

    Numba keys a cached kernel on the hash of its own source file only, so an edit to a helper
    in another file (simd.py, this one) would otherwise leave stale machine code in use.
    """
    package = Path(__file__).resolve().parent
    sources = [p for p in sorted(package.glob("*.py")) if p.name not in _PURE_PYTHON]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    cache = package / "__pycache__"
    stamp = cache / "numba-sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink(missing_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass  # a read-only install: its sources do not change either

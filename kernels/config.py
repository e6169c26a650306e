"""Numba settings for every CPU kernel, in one place.

KERNEL and SERIAL_KERNEL are for entry kernels (called from Python), cached on disk. HELPER is for
functions only called from other kernels: they are compiled into their callers and need no cache
of their own. PARALLEL is for kernels with prange loops that other kernels call: inlined (in
numba's IR) into their callers, which must be parallel themselves, since on a first run each level
of calls re-optimises and re-emits all the machine code below it; SHARED_PARALLEL for those that
several kernels call (matvec): compiled once, called. drop_stale_cache (run when the package is
imported) rebuilds the cache whenever a kernels/*.py file changes; compile_notice says on stderr
when kernels compile instead.
"""

import contextlib
import hashlib
import sys
import time
from pathlib import Path

from numba.core import event

# LLVM's "fast" minus nnan, ninf and afn: reassociation (vectorised sums) and fused multiply-adds,
# while -inf (softmax masks) and overflowing exp keep their IEEE meaning instead of becoming
# undefined. Results stay deterministic: each output element is computed by one thread in a fixed
# order, whatever the thread count.
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})
HELPER = dict(fastmath=set(FASTMATH), nogil=True, boundscheck=False, error_model="numpy")
SERIAL_KERNEL = dict(HELPER, cache=True)
KERNEL = dict(SERIAL_KERNEL, parallel=True)
PARALLEL = dict(HELPER, parallel=True, inline="always")
SHARED_PARALLEL = dict(HELPER, parallel=True)

# no numba code kept in the disk cache (cuda.py's kernels compile per process): edits there keep the cache
_PURE_PYTHON = {"__init__.py", "cuda.py", "reference.py", "threads.py"}


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


class _CompileNotice(event.Listener):
    """Counts and times numba's compilations ("numba:compile" fires on real compilation only, not on
    cache loads); a kernel's helpers compile inside it, so only the outermost compilations count."""

    def __init__(self, stream):
        self.stream, self.depth, self.count, self.seconds, self.started = stream, 0, 0, 0.0, 0.0

    def on_start(self, ev):
        self.depth += 1
        if self.depth == 1:
            if not self.count:
                print("compiling kernels for this machine (first run after install or after an update; "
                      "later runs load them from the cache) ...", file=self.stream, flush=True)
            self.started = time.perf_counter()

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            self.count += 1
            self.seconds += time.perf_counter() - self.started


@contextlib.contextmanager
def compile_notice(stream=None):
    """Within the block, a line on stream (stderr) when the first kernel compiles, and at its end a
    line with the number of kernels compiled and the seconds it took; nothing when every kernel
    came from the cache."""
    listener = _CompileNotice(stream or sys.stderr)
    with event.install_listener("numba:compile", listener):
        yield listener
    if listener.count:
        print(f"compiled {listener.count} kernel{'s' * (listener.count != 1)} in {listener.seconds:.1f} s",
              file=listener.stream, flush=True)

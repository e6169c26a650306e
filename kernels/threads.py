"""How many threads a kernel call uses: set_threads' count while the cores are free, and no more than
the cores other processes leave free while they keep some busy.

Numba's omp layer runs each prange loop as an OpenMP parallel region: the calling thread wakes the
others and waits for all of them at the region's end, about 55 times per token for the tiny model.
When another process keeps a core busy, the thread placed there runs only in its time slices, and
every region waits for it: beside one busy process, -t 2 decoded the tiny model at 8-400 tokens/s
where -t 1 kept its 1300. So every WINDOW seconds, the CPU time the machine spent (/proc/stat, over
this process's CPUs) minus the CPU time this process spent says how many cores other processes keep
busy, and calls use at most the cores left. Results do not depend on the count: each output row is computed by one
thread, in the same order. Without /proc/stat (not Linux), calls use set_threads' count.

The waits themselves are libgomp's: a waiting thread spins GOMP_SPINCOUNT times (300,000, about
10 ms here) before it sleeps, so a thread waiting for a descheduled one burns its own time slice.
Once calls give up the busy cores, GOMP_SPINCOUNT=1000 changed nothing measurable beside a busy or a
half-busy process; it is process-wide, and made llama.cpp (which loads the same libgomp) 1.3-2x
slower in the same process, so it is left to the user.
"""

import os
import time

import numba
import numpy as np

WINDOW = 0.2  # seconds between looks: /proc/stat counts in 10 ms ticks, and reading it costs ~20 us

_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_requested = numba.get_num_threads()  # set_threads' count (numba.get_num_threads costs 1 us a call)
_team = _requested  # numba's thread count now (numba.set_num_threads costs 1 us: set on a change only)
_next_look = 0.0
_last = None  # (machine's busy CPU seconds, this process's CPU seconds, monotonic seconds) at the last look


def set_threads(n: int) -> None:
    """Most threads a kernel call uses (numba.set_num_threads, which is per calling thread)."""
    global _requested, _team, _last, _next_look
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= limit:
        raise ValueError(f"thread count must be an integer in [1, {limit}], got {n!r}")
    numba.set_num_threads(int(n))
    _requested = _team = int(n)
    now = time.monotonic()
    _last, _next_look = _sample(now), now + WINDOW


def get_threads() -> int:
    """Most threads a kernel call uses."""
    return _requested


def team() -> int:
    """Threads (and row chunks) for the next kernel call; numba's thread count is set to match."""
    if _requested > 1:
        now = time.monotonic()
        if now >= _next_look:
            _look(now)
    return _team


def _look(now: float) -> None:
    """Set the team to the cores other processes left free since the last look."""
    global _last, _next_look, _team
    _next_look = now + WINDOW
    last, _last = _last, _sample(now)
    if _last is None or last is None or now - last[2] > 10 * WINDOW:  # nothing recent to compare with
        return
    others = (_last[0] - last[0] - (_last[1] - last[1])) / (now - last[2])  # cores' worth of others' work
    n = min(_requested, max(1, len(_CPUS) - round(others)))
    if n != _team:
        numba.set_num_threads(n)
        _team = n


def _sample(now: float):
    """(CPU seconds this process's CPUs spent on anything but idling since boot, this process's CPU
    seconds, now), or None without /proc/stat. Steal counts as busy: a virtual CPU's host gave it
    to others."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    ticks = 0
    for line in lines[1:]:  # after the machine's total, one line per online CPU: "cpuN user nice ..."
        if not line.startswith(b"cpu"):
            break
        fields = line.split()
        if int(fields[0][3:]) in _CPUS:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
            ticks += user + nice + system + irq + softirq + steal
    return (ticks / _TICK, time.process_time(), now) if _CPUS else None

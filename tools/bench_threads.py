"""Decode speed with 1 and 2 threads, on an idle machine and beside a busy process: does -t 2 hold up
when a core is shared?

    python tools/bench_threads.py [MODEL] [-n 128] [--rounds 3] [--threads 1 2]

Each measurement is a fresh `hybridinfer run -p PROMPT -n N --temp 0 -t T --json` (its
generation_tokens_per_s), and, when llama-cpp-python is importable, llama.cpp's greedy decoding of the
same prompt from the same file in a fresh process. The engines, thread counts and conditions take
turns within each round, so that the machine's changing load falls on all alike; medians over the
rounds are printed. "busy" runs beside one process spinning `while True: pass`, pinned to the last
core and started and stopped by this script; "idle" runs beside whatever else the machine runs (the
load average is printed).

llama.cpp applies SiLU in every llama FFN: the row "--ffn-act silu --sparse off" runs the default
model as llama.cpp does; the default row runs it as its metadata says (ReLU, predicted sparsity).
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from hybridinfer.commands.common import DEFAULT_MODEL

PROMPT = "And it came to pass"
BUSY = "while True: pass"
OURS = {"hybridinfer": [], "hybridinfer --ffn-act silu --sparse off": ["--ffn-act", "silu", "--sparse", "off"]}


def ours(model: Path, flags: list, n: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "hybridinfer.cli", "run", "-m", str(model), "-p", PROMPT, "-n", str(n),
           "--temp", "0", "-t", str(threads), "--json", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)["generation_tokens_per_s"]


def llamacpp(model: Path, n: int, threads: int) -> float:
    cmd = [sys.executable, __file__, str(model), "-n", str(n), "--llamacpp-worker", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: llama.cpp failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout)


def llamacpp_worker(model: Path, n: int, threads: int) -> None:
    """Print llama.cpp's greedy decoding speed (tokens/s over n tokens after the first, as `run` counts)."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(model), n_ctx=n + 64, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    stream = llm.generate(tokens, top_k=1, temp=0.0, repeat_penalty=1.0)
    next(stream)  # prompt evaluated, first token sampled
    start = time.perf_counter()
    for _ in range(n - 1):
        next(stream)
    print((n - 1) / (time.perf_counter() - start))


def cpu_seconds() -> tuple:
    """(seconds the machine's CPUs spent busy, per /proc/stat (0 without it), CPU seconds of this
    script's finished children), to tell how much other processes ran during the measurements."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except OSError:
        busy = 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, children.ru_utime + children.ru_stime


class BusyCore:
    """One process spinning on the last core this process may use, for the duration of a with-block."""

    def __enter__(self):
        self.core = max(os.sched_getaffinity(0))
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY])
        os.sched_setaffinity(self.proc.pid, {self.core})
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    p.add_argument("-n", type=int, default=128, help="tokens to generate per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs=2, default=[1, 2], metavar=("A", "B"),
                   help="the two thread counts compared (ratio B/A)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even if importable")
    p.add_argument("--llamacpp-worker", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llamacpp_worker:
        return llamacpp_worker(a.model, a.n, a.llamacpp_worker)
    if a.n < 2 or a.rounds < 1:
        sys.exit("error: -n must be at least 2 and --rounds at least 1")

    engines = {name: (lambda t, f=flags: ours(a.model, f, a.n, t)) for name, flags in OURS.items()}
    if not a.no_llamacpp and find_spec("llama_cpp"):
        engines["llama.cpp (silu)"] = lambda t: llamacpp(a.model, a.n, t)
    conditions = ("idle", "busy")
    speeds = {(e, c, t): [] for e in engines for c in conditions for t in a.threads}
    others = {c: [0.0, 0.0] for c in conditions}  # CPU seconds of other processes, wall seconds
    for r in range(a.rounds):
        for c in conditions if r % 2 == 0 else reversed(conditions):
            start, (busy, mine) = time.perf_counter(), cpu_seconds()
            with BusyCore() if c == "busy" else contextlib.nullcontext():
                for e, measure in engines.items():
                    for t in a.threads if r % 2 == 0 else reversed(a.threads):
                        speeds[e, c, t].append(measure(t))
            end = cpu_seconds()
            others[c][0] += end[0] - busy - (end[1] - mine)
            others[c][1] += time.perf_counter() - start
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    A, B = a.threads
    load = ", ".join(f"{max(0.0, sec / wall):.2f} during the {c} runs" for c, (sec, wall) in others.items())
    print(f"{a.model.name}, {a.n} tokens, median of {a.rounds} rounds; tokens/s; busy: one `{BUSY}` process "
          f"pinned to core {max(os.sched_getaffinity(0))} of {os.cpu_count()}; cores kept busy by processes "
          f"other than these: {load}\n")
    print(f"| engine | -t {A} idle | -t {B} idle | {B}/{A} idle | -t {A} busy | -t {B} busy | {B}/{A} busy | "
          f"-t {B} busy/idle |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for e in engines:
        m = {(c, t): statistics.median(speeds[e, c, t]) for c in conditions for t in a.threads}
        print(f"| {e} | {m['idle', A]:.0f} | {m['idle', B]:.0f} | {m['idle', B] / m['idle', A]:.2f}x | "
              f"{m['busy', A]:.0f} | {m['busy', B]:.0f} | {m['busy', B] / m['busy', A]:.2f}x | "
              f"{m['busy', B] / m['idle', B]:.2f}x |")


if __name__ == "__main__":
    main()

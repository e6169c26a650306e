"""Benchmark the weight kernels: mat-vec speed per quant type, as llama.cpp decode would use them.

For each type: ms per matvec call (median over repeats) and GB/s of weight bytes read, for an
11008 x 4096 matrix (a 7B FFN) and the SmolLM2-135M shapes (n_out x n_in). Each timing streams
through distinct matrices, --stream-mb in all for the big shape and 128 MB (4x the L3 cache here)
for the small ones, so they are read from memory as in a real decode step; "hot" repeats one
matrix (in cache for the small shapes), which shows the per-call overhead. With --prefill, matmul
(x[T, n_in] @ W.T) too, in GFLOP/s. First, the machine's read bandwidth measured the same way: a
streaming sum over 512 MB of float32 on the same threads, the ceiling each type's GB/s is given a
share of ("of read").

    python tools/bench_kernels.py            # 2 threads, every supported type
    python tools/bench_kernels.py -t 1 --types Q4_0,Q8_0 --prefill
"""

import argparse
import os
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from hybridinfer import kernels
from hybridinfer.kernels import cpu
from hybridinfer.kernels.simd import hsum, load_f32, zeros
from hybridinfer.loader import round_input

BIG = (11008, 4096)
SMALL = [(576, 576), (576, 1536), (1536, 576), (49152, 576)]  # SmolLM2: attn, ffn_down, ffn_up, output
ORDER = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"]
Q = GGMLQuantizationType
# the byte offsets of each type's f16 scale fields in its block (d, then m or dmin where it has one)
SCALE_FIELDS = {Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q2_K: (80, 82), Q.Q3_K: (108,),
                Q.Q6_K: (208,)}


def random_weights(qtype: GGMLQuantizationType, n_out: int, n_in: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n_out, row_bytes) of valid blocks: random quants, f16 scales of plausible size."""
    if qtype == GGMLQuantizationType.F32:
        return rng.standard_normal((n_out, n_in), dtype=np.float32).view(np.uint8)
    if qtype == GGMLQuantizationType.F16:
        return rng.standard_normal((n_out, n_in), dtype=np.float32).astype(np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.BF16:
        return (rng.standard_normal((n_out, n_in), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    fields = SCALE_FIELDS.get(qtype, (0,))
    scales = rng.uniform(0.001, 0.01, (n_out, n_in // block, len(fields))).astype(np.float16).view(np.uint8)
    for k, offset in enumerate(fields):
        w[:, :, offset:offset + 2] = scales[:, :, 2 * k:2 * k + 2]
    return w.reshape(n_out, -1)


def time_calls(fn, mats, repeats: int) -> float:
    """Median over repeats of the seconds per call, cycling through mats once per repeat."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for m in mats:
            fn(m)
        times.append((time.perf_counter() - t0) / len(mats))
    return float(np.median(times))


@njit(parallel=True, fastmath=True)
def _stream_sum(a, n_chunks):
    """The sum of a float32[n] (n a multiple of 64), each of n_chunks contiguous chunks summed by one
    thread in four 16-lane accumulators, so that memory, not the adds, sets the pace."""
    n = a.shape[0] // 64
    partial = np.zeros(n_chunks, np.float32)
    for c in prange(n_chunks):
        s0, s1, s2, s3 = zeros(), zeros(), zeros(), zeros()
        for b in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            s0 = s0 + load_f32(a, 64 * b)
            s1 = s1 + load_f32(a, 64 * b + 16)
            s2 = s2 + load_f32(a, 64 * b + 32)
            s3 = s3 + load_f32(a, 64 * b + 48)
        partial[c] = hsum(s0 + s1 + s2 + s3)
    return partial.sum()


def read_bandwidth(threads: int, repeats: int, rng) -> float:
    """Bytes per second a streaming sum reads from memory: 512 MB of float32, median of repeats."""
    a = rng.standard_normal(128 << 20, dtype=np.float32)
    _stream_sum(a[:1024], threads)  # compile
    return a.nbytes / time_calls(lambda m: _stream_sum(a, threads), [None], repeats)


def bench_matvec(qtype, shape, stream_bytes, repeats, rng):
    n_out, n_in = shape
    first = random_weights(qtype, n_out, n_in, rng)
    n_mats = max(2, -(-stream_bytes // first.nbytes))
    mats = [first] + [random_weights(qtype, n_out, n_in, rng) for _ in range(n_mats - 1)]
    # rounded as the model rounds a mat-vec's input (K-quants take their integer path on such an x)
    x = round_input(qtype, rng.standard_normal((1, n_in), dtype=np.float32))[0].copy()
    out = np.empty(n_out, np.float32)
    kernels.matvec(qtype, first, x, out)  # compile or load from cache
    streamed = time_calls(lambda w: kernels.matvec(qtype, w, x, out), mats, repeats)
    hot = time_calls(lambda w: kernels.matvec(qtype, w, x, out), [first] * 200, repeats)
    return first.nbytes, n_mats, streamed, hot


def bench_matmul(qtype, shape, T, repeats, rng):
    n_out, n_in = shape
    w = random_weights(qtype, n_out, n_in, rng)
    x = rng.standard_normal((T, n_in), dtype=np.float32)
    out = np.empty((T, n_out), np.float32)
    kernels.matmul(qtype, w, x, out)
    return time_calls(lambda m: kernels.matmul(qtype, m, x, out), [w] * max(1, 64 // T), repeats)


def start(parser: argparse.ArgumentParser, args: argparse.Namespace) -> np.random.Generator:
    """Check --repeats and --stream-mb, set --threads, warn when other processes load the machine; the
    seeded random generator of the matrices."""
    if args.repeats < 1 or args.stream_mb < 1:
        parser.error("--repeats and --stream-mb must be positive")
    kernels.set_threads(args.threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f}: other processes share the cores, timings will be noisy")
    return np.random.default_rng(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--threads", type=int, default=2, help="kernel threads (default 2)")
    parser.add_argument("--types", default=",".join(ORDER), help="comma-separated quant types")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes; the median is reported")
    parser.add_argument("--stream-mb", type=int, default=600, help="MB of distinct matrices per timing")
    parser.add_argument("--prefill", action="store_true", help="also time matmul at T = 7 and 512")
    args = parser.parse_args()
    names = [n.strip().upper() for n in args.types.split(",") if n.strip()]
    for n in names:
        if n not in GGMLQuantizationType.__members__ or GGMLQuantizationType[n] not in kernels.SUPPORTED_TYPES:
            parser.error(f"--types: {n!r} is not one of {', '.join(ORDER)}")
    rng = start(parser, args)

    t0 = time.perf_counter()
    kernels.matvec(GGMLQuantizationType.Q4_0, random_weights(GGMLQuantizationType.Q4_0, 4, 32, rng),
                   np.zeros(32, np.float32), np.zeros(4, np.float32))
    print(f"threads {args.threads}; first matvec call (compile or cache load) {time.perf_counter() - t0:.2f} s")
    bandwidth = read_bandwidth(args.threads, args.repeats, rng)
    print(f"read bandwidth (streaming sum over 512 MB, {args.threads} threads): {bandwidth / 1e9:.1f} GB/s")

    for name in names:
        qtype = GGMLQuantizationType[name]
        print(f"\n{name}  matvec                      ms/call   GB/s  of read   hot ms/call  (matrices streamed)")
        for shape in [BIG] + SMALL:
            if shape[1] % GGML_QUANT_SIZES[qtype][0]:
                continue  # n_in not a whole number of blocks
            stream_mb = args.stream_mb if shape == BIG else min(args.stream_mb, 128)
            nbytes, n_mats, streamed, hot = bench_matvec(qtype, shape, stream_mb << 20, args.repeats, rng)
            print(f"  {shape[0]:>6} x {shape[1]:<6} {nbytes / 1e6:8.2f} MB {streamed * 1e3:9.3f} "
                  f"{nbytes / streamed / 1e9:6.2f}  {nbytes / streamed / bandwidth:6.0%}   {hot * 1e3:9.3f}"
                  f"      ({n_mats})")
        if args.prefill:
            for shape, T in [((4096, 4096), 7), ((4096, 4096), 512), ((1536, 576), 512)]:
                if shape[1] % GGML_QUANT_SIZES[qtype][0] == 0:
                    t = bench_matmul(qtype, shape, T, max(1, args.repeats // 2), rng)
                    print(f"  matmul T={T:<3} {shape[0]:>5} x {shape[1]:<5} {t * 1e3:9.2f} ms  "
                          f"{2 * T * shape[0] * shape[1] / t / 1e9:7.1f} GFLOP/s")

    print()
    for shape in [(576, 576), (2, 32)]:
        x, out = np.zeros(shape[1], np.float32), np.zeros(shape[0], np.float32)
        w = kernels._readonly(random_weights(GGMLQuantizationType.Q4_1, *shape, rng))
        kernel = cpu.matvec_for(int(GGMLQuantizationType.Q4_1))
        direct = time_calls(lambda m: kernel(w, x, out, args.threads), [None] * 2000, 5)
        checked = time_calls(lambda m: kernels.matvec(GGMLQuantizationType.Q4_1, w, x, out), [None] * 2000, 5)
        print(f"per call, Q4_1 {shape[0]} x {shape[1]} hot: numba kernel {direct * 1e6:.1f} us, "
              f"kernels.matvec (with argument checks) {checked * 1e6:.1f} us")

if __name__ == "__main__":
    main()

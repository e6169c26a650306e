"""Benchmark the input-sparse mat-vec (kernels.input_sparse_matvec over a column_matrix copy) against
the dense kernels.matvec on the same matrices, with 0%, 40%, 50% and 70% of the inputs dropped.

Shapes n_out x n_in: a 7B model's attention and FFN matrices in Q4_0 and Q8_0, SmolLM2-135M's in Q4_1.
Each timing streams through distinct matrices, --stream-mb in all (beyond the L3 cache), as a decode
step reads them; ms per call is the median over repeats; "ratio" is sparse / dense, both measured in
this run, a pass of each in turn per repeat. x is standard normal, its threshold the quantile of |x|
that drops the given share. The build column is the median time of column_matrix for one matrix; the
last lines extrapolate it to a 7B model (32 layers of 4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008).

    python tools/bench_columns.py             # 2 threads
    python tools/bench_columns.py -t 1 --stream-mb 128
"""

import argparse
import time

import numpy as np
from bench_kernels import random_weights, start, time_calls
from gguf import GGMLQuantizationType

from hybridinfer import kernels

Q = GGMLQuantizationType
CASES = [(Q.Q4_0, (4096, 4096)), (Q.Q4_0, (11008, 4096)), (Q.Q4_0, (4096, 11008)),
         (Q.Q8_0, (4096, 4096)), (Q.Q8_0, (11008, 4096)), (Q.Q8_0, (4096, 11008)),
         (Q.Q4_1, (576, 576)), (Q.Q4_1, (1536, 576)), (Q.Q4_1, (576, 1536))]
DROPPED = [0.0, 0.4, 0.5, 0.7]


def bench_case(qtype, shape, stream_bytes, repeats, rng):
    """(dense ms, [sparse ms per dropped share], build ms, MB of one matrix, matrices streamed). Each repeat
    times one pass of each kernel in turn, so that a change in the machine's load hits them alike."""
    n_out, n_in = shape
    first = random_weights(qtype, n_out, n_in, rng)
    n_mats = max(2, -(-stream_bytes // first.nbytes))
    mats = [first] + [random_weights(qtype, n_out, n_in, rng) for _ in range(n_mats - 1)]
    builds, cms = [], []
    for w in mats:
        t0 = time.perf_counter()
        cms.append(kernels.column_matrix(qtype, w))
        builds.append(time.perf_counter() - t0)
    x = rng.standard_normal(n_in, dtype=np.float32)
    out = np.empty(n_out, np.float32)
    kernels.matvec(qtype, first, x, out)  # compile or load from cache
    kernels.input_sparse_matvec(cms[0], x, 0.0, out)
    thresholds = [float(np.quantile(np.abs(x), share)) if share else 0.0 for share in DROPPED]
    dense, sparse = [], [[] for _ in DROPPED]
    for _ in range(repeats):
        dense.append(time_calls(lambda w: kernels.matvec(qtype, w, x, out), mats, 1))
        for times, threshold in zip(sparse, thresholds):
            times.append(time_calls(lambda cm: kernels.input_sparse_matvec(cm, x, threshold, out), cms, 1))
    return (float(np.median(dense)), [float(np.median(t)) for t in sparse], float(np.median(builds[1:])),
            first.nbytes / 1e6, n_mats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--threads", type=int, default=2, help="kernel threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes; the median is reported")
    parser.add_argument("--stream-mb", type=int, default=256, help="MB of distinct matrices per timing")
    args = parser.parse_args()
    rng = start(parser, args)
    print(f"threads {args.threads}, {args.stream_mb} MB of matrices streamed per timing, median of {args.repeats}\n")
    print("| type | n_out x n_in | MB | dense ms (GB/s) | " + " | ".join(f"{p:.0%} dropped ms (ratio)" for p in DROPPED)
          + " | build ms |")
    print("|---|---|---:|---:|" + "---:|" * len(DROPPED) + "---:|")
    build_ms = {}
    for qtype, shape in CASES:
        dense, sparse, build, mb, n_mats = bench_case(qtype, shape, args.stream_mb << 20, args.repeats, rng)
        build_ms[qtype, shape] = build * 1e3
        cells = " | ".join(f"{s * 1e3:.3f} ({s / dense:.2f})" for s in sparse)
        print(f"| {qtype.name} | {shape[0]} x {shape[1]} | {mb:.2f} | {dense * 1e3:.3f} ({mb / 1e3 / dense:.0f}) "
              f"| {cells} | {build * 1e3:.1f} |", flush=True)
    for qtype in (Q.Q4_0, Q.Q8_0):
        total = 32 * (4 * build_ms[qtype, (4096, 4096)] + 2 * build_ms[qtype, (11008, 4096)]
                      + build_ms[qtype, (4096, 11008)]) / 1e3
        print(f"\n7B {qtype.name}: column_matrix for its 224 matrices ~{total:.1f} s", end="")
    print()


if __name__ == "__main__":
    main()

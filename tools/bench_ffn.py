"""Time one FFN layer, decode (one token), in the three modes: dense, exact and predicted.

Made-up weights of a given shape and quant type (default: ProSparse-7B's 4096 x 11008 in Q4_0) and a
made-up predictor whose threshold leaves a chosen share of neurons active: honest for speed,
meaningless for text. Each mode runs in the same process over the same weights, so the ratios
compare like with like. Matrices of several layers are cycled so that they stream from memory
rather than sit in cache, as in a real model.

    python tools/bench_ffn.py [--n-embd 4096] [--n-ff 11008] [--type Q4_0] [--active 0.11] [--rank 1024]
"""

import argparse
import statistics
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybridinfer import kernels
from hybridinfer.ffn import make_ffn
from hybridinfer.loader import Block, FFNActivation, Matrix, ModelArgs
from hybridinfer.predictors import PredictorSet
from hybridinfer.predictors.mlp import PREDICTOR_QTYPES


def random_matrix(rng, qtype: GGMLQuantizationType, n_in: int, n_out: int, scale: float = 0.01) -> Matrix:
    """Random zero-mean weights of qtype: 4-bit codes 1..15 (Q4_0: values scale * (q - 8)), int8 codes
    -127..127 (Q8_0), or normal values (F16); every block's f16 scale is `scale` (Q4_1's min -8 * scale)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype == GGMLQuantizationType.F16:
        data = (rng.standard_normal((n_out, n_in)) * scale).astype(np.float16).view(np.uint8)
        return Matrix(qtype, data, n_in, n_out)
    blocks = rng.integers(0, 256, (n_out, n_in // block, size), dtype=np.uint8)
    header = 2 if qtype != GGMLQuantizationType.Q4_1 else 4
    blocks[:, :, 0:2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    if qtype == GGMLQuantizationType.Q4_1:
        blocks[:, :, 2:4] = np.frombuffer(np.float16(-8 * scale).tobytes(), np.uint8)
    if qtype == GGMLQuantizationType.Q8_0:
        blocks[:, :, header:] = rng.integers(-127, 128, (n_out, n_in // block, size - header)).astype(np.int8).view(np.uint8)
    else:
        low, high = (rng.integers(1, 16, (n_out, n_in // block, size - header), dtype=np.uint8) for _ in range(2))
        blocks[:, :, header:] = low | (high << 4)
    return Matrix(qtype, blocks.reshape(n_out, -1), n_in, n_out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-embd", type=int, default=4096)
    p.add_argument("--n-ff", type=int, default=11008)
    p.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q4_1", "Q8_0", "F16"])
    p.add_argument("--active", type=float, default=0.11, help="share of neurons predicted active")
    p.add_argument("--rank", type=int, default=1024, help="predictor rank")
    p.add_argument("--predictor-type", default="q8_0", choices=list(PREDICTOR_QTYPES))
    p.add_argument("--layers", type=int, default=16,
                   help="distinct layers cycled, so that weights (the predicted rows too) stream from memory, not L3")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=30)
    a = p.parse_args()
    kernels.set_threads(a.threads)
    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[a.type]
    args = ModelArgs(n_layer=a.layers, n_embd=a.n_embd, n_ff=a.n_ff, n_head=1, n_head_kv=1, head_dim=a.n_embd,
                     rope_dim=a.n_embd, rope_base=1e4, norm_eps=1e-5, n_ctx_train=1, n_vocab=1,
                     ffn_act=FFNActivation("relu"))
    blocks = [Block(None, None, None, None, None, None, random_matrix(rng, qtype, a.n_embd, a.n_ff),
                    random_matrix(rng, qtype, a.n_embd, a.n_ff), random_matrix(rng, qtype, a.n_ff, a.n_embd))
              for _ in range(a.layers)]
    # predictor: random weights, each layer's threshold at the (1 - active) quantile of its logits
    fc1 = [rng.standard_normal((a.rank, a.n_embd)).astype(np.float32) * 0.02 for _ in range(a.layers)]
    fc2 = [rng.standard_normal((a.n_ff, a.rank)).astype(np.float32) * 0.02 for _ in range(a.layers)]
    xs = rng.standard_normal((a.layers, 1, a.n_embd)).astype(np.float32)
    thresholds = [float(np.quantile(fc2[i] @ np.maximum(fc1[i] @ xs[i, 0], 0), 1 - a.active))
                  for i in range(a.layers)]
    predictor = PredictorSet.from_arrays(fc1, fc2, thresholds, qtype=a.predictor_type)
    out = np.zeros((1, a.n_embd), np.float32)
    results = {}
    for mode in ("off", "exact", "predicted"):
        ffn = make_ffn(mode, args, blocks, 1, predictor)
        for i in range(a.layers):  # warm-up: compile, fault pages in
            ffn(i, blocks[i], xs[i], xs[i], out)
        times = []
        for r in range(a.repetitions):
            i = r % a.layers
            start = time.perf_counter()
            ffn(i, blocks[i], xs[i], xs[i], out)
            times.append(time.perf_counter() - start)
        results[mode] = statistics.median(times)
    predictor_times = []
    for r in range(a.repetitions):
        i = r % a.layers
        start = time.perf_counter()
        predictor.active_indices(i, xs[i, 0])
        predictor_times.append(time.perf_counter() - start)
    active = np.mean([len(predictor.active_indices(i, xs[i, 0])) / a.n_ff for i in range(a.layers)])
    print(f"FFN {a.n_embd} x {a.n_ff} {a.type}, {a.threads} threads, {100 * active:.1f}% of neurons predicted "
          f"active, predictor rank {a.rank} in {a.predictor_type} (made-up weights: speed only)")
    print("| mode | ms per layer | vs dense |")
    print("| --- | ---: | ---: |")
    for mode, label in (("off", "dense"), ("exact", "exact"), ("predicted", "predicted (predictor included)")):
        print(f"| {label} | {1e3 * results[mode]:.3f} | {results['off'] / results[mode]:.2f}x |")
    print(f"| predictor alone | {1e3 * statistics.median(predictor_times):.3f} | |")


if __name__ == "__main__":
    main()

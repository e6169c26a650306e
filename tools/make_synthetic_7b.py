"""Make a ProSparse-7B-shaped llama GGUF with made-up Q4_0 weights, and a made-up predictor for it.

32 layers, n_embd 4096, n_ff 11008, 32 heads, vocabulary 32000, ReLU FFN; about 3.8 GB. Honest for
speed, meaningless for text: use it only to compare decoding speed with llama.cpp on the same file,
or to place hot and cold neurons.

Neurons fire as in real ReLU models, a few often and most rarely: each neuron of each layer gets a
target firing rate from a power law (--top-share of all activations carried by the hottest 20% of
neurons, PowerInfer's 80/20 for ReLU 7B models by default; mean --active), the hottest in a random
order per layer. The rates come from a bias channel: every token embedding holds the constant
BIAS_VALUE in coordinate 0, which no other matrix reads or writes, and each gate row's first Q4_0
block holds only a per-neuron weight on that coordinate, an offset to the neuron's input chosen so
that it fires at its rate over --calibration random token sequences (prefilled). The predictor (rank
1024) has random weights plus the same kind of offset through its first BIAS_RANK hidden units,
which read coordinate 0 alone, set on the same sequences; the residual stream of predicted mode
differs from dense mode's, so the offsets are set again on predicted mode with the previous ones,
three times. Predicted and true sets follow the same rates but are otherwise independent: recall is
low, speed and placement are what the file is for.

    python tools/make_synthetic_7b.py -o /tmp/synth7b.gguf
    hybridinfer bench -m /tmp/synth7b.gguf --predictor /tmp/synth7b.predictor -p 0 -n 16 -r 3 --vs-llamacpp
"""

import argparse
from statistics import NormalDist
from pathlib import Path

import numpy as np
from bench_ffn import random_matrix
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from hybridinfer.gguf_file import GGUFFile
from hybridinfer.ffn import make_ffn
from hybridinfer.loader import ModelArgs, load_weights
from hybridinfer.model import Transformer
from hybridinfer.predictors import PredictorSet, PredictorWeights, fingerprint, save

Q4_0 = GGMLQuantizationType.Q4_0
SCALE = 0.002  # every block's scale: keeps activations finite over 32 layers
BIAS_VALUE = 1.0  # coordinate 0 of every token embedding: the bias channel
BIAS_RANK = 32  # predictor hidden units carrying the offsets: one whole Q4_0 block of fc2, which q4_0 keeps exact
TOP = 0.2  # --top-share is the share of activations carried by this share of neurons, hottest first
MAX_RATE = 0.99  # no neuron fires always: its offset would be infinite


def power_law_rates(n: int, active: float, top_share: float) -> np.ndarray:
    """Firing rates f64[n], hottest first: min(MAX_RATE, A * x^-alpha) at x = (k + 0.5) / n, with alpha and A
    chosen (by bisection) so that the mean is `active` and the hottest TOP of neurons carry top_share."""
    x = (np.arange(n) + 0.5) / n

    def rates(alpha: float) -> np.ndarray:
        lo, hi = 0.0, MAX_RATE  # A: the rate at x = 1 is A, so A > MAX_RATE would leave every rate at the cap
        for _ in range(60):
            a = (lo + hi) / 2
            lo, hi = (a, hi) if np.minimum(MAX_RATE, a * x ** -alpha).mean() < active else (lo, a)
        return np.minimum(MAX_RATE, lo * x ** -alpha)

    lo, hi = 0.0, 8.0
    for _ in range(40):
        alpha = (lo + hi) / 2
        r = rates(alpha)
        lo, hi = (alpha, hi) if r[:round(TOP * n)].sum() / r.sum() < top_share else (lo, alpha)
    return rates(lo)


def layer_rates(rng, n_layer: int, n_ff: int, active: float, top_share: float) -> list[np.ndarray]:
    """power_law_rates per layer, in a random neuron order per layer: the hot neurons are not the first rows."""
    rates = power_law_rates(n_ff, active, top_share)
    return [rng.permutation(rates) for _ in range(n_layer)]


def q4_0_blocks(rng, n_out: int, n_in: int) -> np.ndarray:
    return random_matrix(rng, Q4_0, n_in, n_out, SCALE).data


def _f16_bytes(values) -> np.ndarray:
    return np.atleast_1d(np.asarray(values, np.float16)).view(np.uint8).reshape(-1, 2)


def without_bias_input(data: np.ndarray) -> np.ndarray:
    """Q4_0 rows with element 0 (the low nibble of byte 2, after the f16 scale) set to code 8, value 0."""
    data[:, 2] = (data[:, 2] & 0xF0) | 8
    return data


def write_model(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_vocab: int, seed: int) -> None:
    """Random Q4_0 weights around the bias channel: embeddings hold BIAS_VALUE in coordinate 0, only gate rows
    read it (their first block is the bias weight alone, 0 until set_gate_offsets), nothing writes it."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name("synthetic ProSparse-7B-shaped model (made-up weights, speed only)")
    for add, value in ((w.add_block_count, n_layer), (w.add_context_length, 4096), (w.add_embedding_length, n_embd),
                       (w.add_feed_forward_length, n_ff), (w.add_head_count, n_head), (w.add_head_count_kv, n_head),
                       (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, n_vocab)):
        add(value)
    w.add_string("hybridinfer.ffn_activation", "relu")
    words = n_vocab - 259
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *[f"▁w{i}" for i in range(words)]])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(words)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * words)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    ones = np.ones(n_embd, np.float32)
    embd = q4_0_blocks(rng, n_vocab, n_embd)
    embd[:, 0:2] = _f16_bytes(-BIAS_VALUE / 8)  # code 0 is -8 * scale: BIAS_VALUE, the rest of the block 0
    embd[:, 2:18] = 0x88
    embd[:, 2] = 0x80
    w.add_tensor("token_embd.weight", embd, raw_dtype=Q4_0)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"blk.{i}.{name}.weight", without_bias_input(q4_0_blocks(rng, n_embd, n_embd)), raw_dtype=Q4_0)
        out = q4_0_blocks(rng, n_embd, n_embd)
        out[0] = 0  # scale 0: row 0 writes nothing to the bias coordinate
        w.add_tensor(f"blk.{i}.attn_output.weight", out, raw_dtype=Q4_0)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        gate = q4_0_blocks(rng, n_ff, n_embd)
        gate[:, 0:2] = 0  # the bias weight's scale, set by set_gate_offsets
        gate[:, 2:18] = 0x88
        gate[:, 2] = 0x80  # element 0 is code 0, -8 * scale: the bias weight
        w.add_tensor(f"blk.{i}.ffn_gate.weight", gate, raw_dtype=Q4_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", without_bias_input(q4_0_blocks(rng, n_ff, n_embd)), raw_dtype=Q4_0)
        down = q4_0_blocks(rng, n_embd, n_ff)
        down[0] = 0
        w.add_tensor(f"blk.{i}.ffn_down.weight", down, raw_dtype=Q4_0)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q4_0_blocks(rng, n_vocab, n_embd), raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_GRID = np.linspace(-12.0, 12.0, 4801)  # the normal distribution's CDF, tabled for np.interp
_CDF = np.array([NormalDist().cdf(v) for v in _GRID])


def offsets_for_rates(means: np.ndarray, sds: np.ndarray, spread: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Offsets b f32[n] such that mean over tokens t of P(y_j + b_j > 0) = rates_j, for y_j normal with mean
    spread_t * means_j and sd spread_t * sds_j (bisection, all neurons at once).

    A neuron's input is a random direction's product with the residual stream, so that from the stream's
    size spread[T] alone it is modelled well enough for a first guess, before any measurement."""
    spread = spread[:, None]
    lo = -spread.max() * (np.abs(means) + 13 * sds)
    hi = -lo
    for _ in range(50):
        b = (lo + hi) / 2
        low = np.interp((b + spread * means) / (spread * sds), _GRID, _CDF).mean(0) < rates
        lo, hi = np.where(low, b, lo), np.where(low, hi, b)
    return ((lo + hi) / 2).astype(np.float32)


def row_norms_without_bias(data: np.ndarray) -> np.ndarray:
    """f64[n] Euclidean norms of Q4_0 rows data uint8[n, row_bytes], their first block (the bias weight) left out."""
    blocks = data.reshape(len(data), -1, 18)[:, 1:]
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    q = np.concatenate([blocks[:, :, 2:] & 15, blocks[:, :, 2:] >> 4], axis=2).astype(np.float64) - 8
    return np.sqrt((d ** 2 * (q ** 2).sum(2)).sum(1))


def fitted_offsets(y: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Offsets b f32[n] such that y + b > 0 on a share `rates` of tokens, y[T, n] taken as normal per neuron
    (a few hundred tokens cannot count a rate of 1e-3)."""
    z = np.array([NormalDist().inv_cdf(r) for r in rates])
    return (y.std(0) * z - y.mean(0)).astype(np.float32)


def sequences(args: ModelArgs, n_seq: int, n_tokens: int, seed: int) -> list[np.ndarray]:
    """Random token sequences: measurements pool several, since the tokens of one sequence share much of their
    residual stream through attention."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, args.n_vocab, n_tokens) for _ in range(n_seq)]


def set_gate_offsets(path: Path, rates: list[np.ndarray], n_seq: int, n_tokens: int, seed: int, passes: int = 2) -> None:
    """Each gate row's weight b on the bias coordinate, which makes its neuron fire at its rate; written into the
    file. First per layer, in order, on one sequence prefilled, for the sizes of its residual stream (the later
    layers see the earlier ones' final activations); then `passes` times, every layer at once, fitted to
    each neuron's input measured over n_seq sequences with the offsets so far."""
    gates = [t.data for t in GGUFReader(path, "r+").tensors if t.name.endswith("ffn_gate.weight")]
    gguf = GGUFFile(path)  # maps the same pages: it reads the offsets once written
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    dense = make_ffn("off", args, weights.blk, n_tokens)
    z = np.zeros((n_tokens, args.n_ff), np.float32)
    inputs = [[] for _ in range(args.n_layer)]

    def write(layer, offsets):
        gates[layer][:, 0:2] = _f16_bytes(-offsets / 8)

    def first(layer, blk, resid, xn, out):
        # the neuron fires where b * BIAS_VALUE + gate_row . resid[1:] > 0, the norm scaling both alike
        sds = row_norms_without_bias(gates[layer]) / np.sqrt(args.n_embd - 1)
        spread = np.linalg.norm(resid[:, 1:], axis=1) / BIAS_VALUE
        write(layer, offsets_for_rates(np.zeros_like(sds), sds, spread, rates[layer]))
        dense(layer, blk, resid, xn, out)

    def measured(layer, blk, resid, xn, out):
        blk.ffn_gate(xn, z)
        offsets = -8 * gates[layer][:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
        inputs[layer].append(z / xn[:, :1] - offsets)  # the input without the offset, in units of the bias
        dense(layer, blk, resid, xn, out)

    tokens = sequences(args, n_seq, n_tokens, seed)
    Transformer(args, weights, n_tokens, first, n_batch=n_tokens).forward(tokens[0], 0)
    for _ in range(passes):
        for seq in tokens:
            Transformer(args, weights, n_tokens, measured, n_batch=n_tokens).forward(seq, 0)
        for layer in range(args.n_layer):
            write(layer, fitted_offsets(np.concatenate(inputs[layer]), rates[layer]))
            inputs[layer].clear()
    for data in gates:
        data.base.flush()


class _Recorder:
    """An FFN that keeps each layer's predictor input (the residual stream before ffn_norm)."""

    def __init__(self, ffn, n_layer: int):
        self.ffn, self.inputs = ffn, [[] for _ in range(n_layer)]

    def __call__(self, layer, blk, resid, xn, out):
        self.inputs[layer].append(resid.copy())
        self.ffn(layer, blk, resid, xn, out)


def write_predictor(model_path: Path, out: Path, rank: int, rates: list[np.ndarray], n_seq: int, n_tokens: int,
                    seed: int, rounds: int = 3) -> None:
    """Random weights but for each neuron's offset (fc2's first BIAS_RANK columns, times the bias coordinate),
    fitted to its logits over n_seq sequences prefilled: by dense mode first, then `rounds` times by
    predicted mode with the offsets so far, whose residual stream differs from dense mode's."""
    gguf = GGUFFile(model_path)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    rng = np.random.default_rng(seed)
    fc1 = [(rng.standard_normal((rank, args.n_embd)) / np.sqrt(args.n_embd)).astype(np.float16)
           for _ in range(args.n_layer)]
    for w1 in fc1:  # the first BIAS_RANK hidden units read the bias coordinate alone, the others never
        w1[:, 0] = 0
        w1[:BIAS_RANK] = 0
        w1[:BIAS_RANK, 0] = 1
    fc2 = [(rng.standard_normal((args.n_ff, rank)) / np.sqrt(rank)).astype(np.float16) for _ in range(args.n_layer)]
    for w2 in fc2:
        w2[:, :BIAS_RANK] = 0
    thresholds = [0.0] * args.n_layer
    tokens = sequences(args, n_seq, n_tokens, seed + 1)
    for done in range(rounds + 1):
        if done == 0:
            ffn = make_ffn("off", args, weights.blk, n_tokens)
        else:
            ffn = make_ffn("predicted", args, weights.blk, n_tokens, PredictorSet.from_arrays(fc1, fc2, thresholds))
        recorder = _Recorder(ffn, args.n_layer)
        for seq in tokens:
            Transformer(args, weights, n_tokens, recorder, n_batch=n_tokens).forward(seq, 0)
        for i in range(args.n_layer):
            x = np.concatenate(recorder.inputs[i])
            logits = np.maximum(x @ fc1[i][BIAS_RANK:].T.astype(np.float32), 0) @ fc2[i][:, BIAS_RANK:].T.astype(np.float32)
            fc2[i][:, :BIAS_RANK] = (fitted_offsets(logits, rates[i]) / (BIAS_RANK * BIAS_VALUE))[:, None]
    fp = fingerprint("llama", args.n_layer, args.n_embd, args.n_ff, {n: t.shape for n, t in gguf.tensors.items()})
    save(out, PredictorWeights(fc1, fc2, thresholds, fp,
                               {"training": {"what": f"made-up: random weights, per-neuron offsets for power-law rates "
                                                     f"(mean {np.mean(rates):.1%}) on {n_seq} x {n_tokens} random "
                                                     f"tokens; speed only"}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, required=True, help="GGUF file to write; DIR.predictor beside it")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--active", type=float, default=0.11, help="mean firing rate, truly and as predicted")
    p.add_argument("--top-share", type=float, default=0.8,
                   help=f"share of activations carried by the hottest {TOP:.0%} of neurons (PowerInfer's 80/20)")
    p.add_argument("--calibration", type=int, nargs=2, default=[16, 32], metavar=("SEQUENCES", "TOKENS"),
                   help="random token sequences that set the offsets, and their length")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    n_ff = 11008
    rates = layer_rates(np.random.default_rng(a.seed + 2), a.layers, n_ff, a.active, a.top_share)
    write_model(a.output, a.layers, 4096, n_ff, 32, 32000, a.seed)
    set_gate_offsets(a.output, rates, *a.calibration, a.seed + 3)
    write_predictor(a.output, a.output.with_suffix(".predictor"), a.rank, rates, *a.calibration, a.seed + 1)
    print(a.output, a.output.with_suffix(".predictor"))


if __name__ == "__main__":
    main()

"""Make a ProSparse-7B-shaped llama GGUF with made-up Q4_0 weights, and a made-up predictor for it.

32 layers, n_embd 4096, n_ff 11008, 32 heads, vocabulary 32000, ReLU FFN; about 3.8 GB. The
predictor (rank 1024) has random weights and per-layer thresholds set, on 16 random tokens decoded
one at a time as bench's tg does, at the quantile that leaves --active of the neurons active; the
residual stream of predicted decoding differs from dense decoding's, so the thresholds are set again
on predicted decoding with the previous ones, three times. Honest for speed, meaningless
for text: use it only to compare decoding speed with llama.cpp on the same file.

    python tools/make_synthetic_7b.py -o /tmp/synth7b.gguf
    hybridinfer bench -m /tmp/synth7b.gguf --predictor /tmp/synth7b.predictor -p 0 -n 16 -r 3 --vs-llamacpp
"""

import argparse
from pathlib import Path

import numpy as np
from bench_ffn import random_matrix
from gguf import GGMLQuantizationType, GGUFWriter

from hybridinfer.gguf_file import GGUFFile
from hybridinfer.ffn import make_ffn
from hybridinfer.loader import ModelArgs, load_weights
from hybridinfer.model import Transformer
from hybridinfer.predictors import PredictorSet, PredictorWeights, fingerprint, save

Q4_0 = GGMLQuantizationType.Q4_0
SCALE = 0.002  # every block's scale: keeps activations finite over 32 layers


def q4_0_blocks(rng, n_out: int, n_in: int) -> np.ndarray:
    return random_matrix(rng, Q4_0, n_in, n_out, SCALE).data


def write_model(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_vocab: int, seed: int) -> None:
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
    w.add_tensor("token_embd.weight", q4_0_blocks(rng, n_vocab, n_embd), raw_dtype=Q4_0)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", q4_0_blocks(rng, n_embd, n_embd), raw_dtype=Q4_0)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", q4_0_blocks(rng, n_ff, n_embd), raw_dtype=Q4_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q4_0_blocks(rng, n_ff, n_embd), raw_dtype=Q4_0)
        w.add_tensor(f"blk.{i}.ffn_down.weight", q4_0_blocks(rng, n_embd, n_ff), raw_dtype=Q4_0)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", q4_0_blocks(rng, n_vocab, n_embd), raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class _Recorder:
    """An FFN that keeps each layer's predictor input (the residual stream before ffn_norm)."""

    def __init__(self, ffn, n_layer: int):
        self.ffn, self.inputs = ffn, [[] for _ in range(n_layer)]

    def __call__(self, layer, blk, resid, xn, out):
        self.inputs[layer].append(resid.copy())
        self.ffn(layer, blk, resid, xn, out)


def write_predictor(model_path: Path, out: Path, rank: int, active: float, n_tokens: int, seed: int,
                    rounds: int = 3) -> None:
    gguf = GGUFFile(model_path)
    args = ModelArgs.from_metadata(gguf.metadata)
    weights = load_weights(gguf, args)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, args.n_vocab, n_tokens)
    fc1 = [(rng.standard_normal((rank, args.n_embd)) / np.sqrt(args.n_embd)).astype(np.float16)
           for _ in range(args.n_layer)]
    fc2 = [(rng.standard_normal((args.n_ff, rank)) / np.sqrt(rank)).astype(np.float16) for _ in range(args.n_layer)]
    thresholds = None
    for _ in range(rounds + 1):
        if thresholds is None:  # first round: dense decoding
            ffn = make_ffn("off", args, weights.blk, 1)
        else:
            ffn = make_ffn("predicted", args, weights.blk, 1, PredictorSet.from_arrays(fc1, fc2, thresholds))
        recorder = _Recorder(ffn, args.n_layer)
        model = Transformer(args, weights, n_tokens, recorder)
        for pos, token in enumerate(tokens):
            model.forward(np.array([token]), pos)
        thresholds = []
        for i in range(args.n_layer):
            x = np.concatenate(recorder.inputs[i])
            logits = np.maximum(x @ fc1[i].T.astype(np.float32), 0) @ fc2[i].T.astype(np.float32)
            thresholds.append(float(np.quantile(logits, 1 - active)))
    fp = fingerprint("llama", args.n_layer, args.n_embd, args.n_ff, {n: t.shape for n, t in gguf.tensors.items()})
    save(out, PredictorWeights(fc1, fc2, thresholds, fp,
                               {"training": {"what": f"made-up: random weights, thresholds for {active:.0%} active "
                                                     f"on {n_tokens} random tokens decoded; speed only"}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, required=True, help="GGUF file to write; DIR.predictor beside it")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--active", type=float, default=0.11, help="share of neurons the predictor marks active")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_model(a.output, a.layers, 4096, 11008, 32, 32000, a.seed)
    write_predictor(a.output, a.output.with_suffix(".predictor"), a.rank, a.active, 16, a.seed + 1)
    print(a.output, a.output.with_suffix(".predictor"))


if __name__ == "__main__":
    main()

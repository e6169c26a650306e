"""The llama forward pass, read top to bottom: embedding, blocks of attention and FFN, output."""

import math
from pathlib import Path

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.kernels import AttentionDecoder
from hybridinfer.kernels.ops import attention, rms_norm, rope
from hybridinfer.ffn import DenseFFN
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import FFNActivation, ModelArgs, Weights, load_weights

N_BATCH = 512  # tokens per prefill step, as llama.cpp's default micro-batch


class RunState:
    """Scratch buffers and KV cache, allocated once; the forward pass takes views of the first T rows."""

    CACHES = ("k_cache", "v_cache")  # f16, as llama.cpp's cache; every other buffer f32

    @staticmethod
    def shapes(args: ModelArgs, n_ctx: int, n_batch: int) -> dict[str, tuple[int, ...]]:
        """Each buffer's name and shape."""
        e, q, kv = args.n_embd, args.n_head * args.head_dim, args.n_head_kv * args.head_dim
        return {
            "x": (n_batch, e),  # residual stream
            "xn": (n_batch, e),  # normed input of attention or FFN
            "q": (n_batch, q),
            "k": (n_batch, kv),
            "v": (n_batch, kv),
            "att": (n_batch, q),  # attention output, before attn_output
            "scores": (args.n_head, n_ctx),  # attention weights of one query
            "y": (n_batch, e),  # block output added to the residual
            "logits": (n_batch, args.n_vocab),
            # KV cache per layer: [n_head_kv, n_ctx, head_dim]
            "k_cache": (args.n_layer, args.n_head_kv, n_ctx, args.head_dim),
            "v_cache": (args.n_layer, args.n_head_kv, n_ctx, args.head_dim),
        }

    @classmethod
    def nbytes(cls, args: ModelArgs, n_ctx: int, n_batch: int) -> int:
        return sum(cls._dtype(name).itemsize * math.prod(shape)
                   for name, shape in cls.shapes(args, n_ctx, n_batch).items())

    @classmethod
    def _dtype(cls, name: str) -> np.dtype:
        return np.dtype(np.float16 if name in cls.CACHES else np.float32)

    def __init__(self, args: ModelArgs, n_ctx: int, n_batch: int):
        for name, shape in self.shapes(args, n_ctx, n_batch).items():
            setattr(self, name, np.zeros(shape, self._dtype(name)))


class Transformer:
    def __init__(self, args: ModelArgs, weights: Weights, n_ctx: int, ffn=None, n_batch: int = N_BATCH,
                 inputs=None):
        if n_ctx < 1:
            raise HybridInferError(f"context size {n_ctx} is out of range: give at least 1 token")
        self.args, self.w, self.n_ctx, self.n_batch = args, weights, n_ctx, n_batch
        self.ffn = ffn or DenseFFN(args, n_batch)
        # inputs.InputSparsity (--sparse input): called as inputs(layer, name, matrix, x, out) for the
        # attention's matrices of a batch, and of a decode step when it counts them or has no column copies
        self.inputs = inputs
        self.s = RunState(args, n_ctx, n_batch)
        inv_freq = args.rope_base ** (-np.arange(0, args.rope_dim, 2, dtype=np.float64) / args.rope_dim)
        angles = np.outer(np.arange(n_ctx), inv_freq)  # [n_ctx, rope_dim/2]
        self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        self.eps = np.float32(args.norm_eps)
        # decoding one token: each layer's attention block in one kernel call (with input sparsity, over
        # its column-major copies)
        self.attention_decoders = [
            AttentionDecoder(blk.attn_norm, self.eps, blk.attn_q.operand, blk.attn_k.operand, blk.attn_v.operand,
                             blk.attn_output.operand, args.n_head, self.cos, self.sin, self.s.k_cache[i],
                             self.s.v_cache[i], inputs.attention_columns(i) if inputs else None)
            for i, blk in enumerate(weights.blk)]

    def warm_up(self) -> None:
        """Run prefill steps of 3 and 2 tokens (mat-muls; mat-vecs token by token) and a decode step on
        token 0, so that every kernel a run calls compiles (on a first run) or loads from numba's cache
        now, before any text streams. The KV cache rows written are overwritten before they are read
        (position p attends to positions up to p, which a run writes first); the FFN's statistics and
        counters are left as they were."""
        n = min(3, self.n_ctx - 1)
        with self.ffn.uncounted():
            for t in range(n, 1, -1):
                self.forward(np.zeros(t, np.int64), 0)
            self.forward(np.zeros(1, np.int64), n)

    def forward(self, tokens: np.ndarray, pos: int, all_logits: bool = False) -> np.ndarray:
        """Logits [T, n_vocab] (or [1, n_vocab] for the last token) after feeding tokens at pos..

        Up to n_batch tokens the result is a view of the run state, valid until the next call.
        """
        tokens = np.asarray(tokens, np.int64)
        if pos + len(tokens) > self.n_ctx:
            raise HybridInferError(f"{pos + len(tokens)} tokens do not fit the context of {self.n_ctx} (-c)")
        if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= self.args.n_vocab:
            raise HybridInferError(f"token ids must lie in 0..{self.args.n_vocab - 1}")
        if len(tokens) <= self.n_batch:
            return self._step(tokens, pos, all_logits)
        out = np.empty((len(tokens), self.args.n_vocab), np.float32) if all_logits else None
        for i in range(0, len(tokens), self.n_batch):
            logits = self._step(tokens[i:i + self.n_batch], pos + i, all_logits)
            if all_logits:
                out[i:i + len(logits)] = logits
        return out if all_logits else logits

    def _attention(self, i: int, blk, pos: int, T: int) -> None:
        """Attention for T tokens at pos..: rmsnorm, q/k/v, RoPE, cache, causal GQA, output projection,
        residual (for one token, AttentionDecoder runs the same steps in one kernel call)."""
        a, s = self.args, self.s
        x, xn, y = s.x[:T], s.xn[:T], s.y[:T]
        # per-head views: q, att [T, n_head, head_dim]; k, v [T, n_head_kv, head_dim]
        q, k, v, att = s.q[:T], s.k[:T], s.v[:T], s.att[:T]
        q3, att3 = q.reshape(T, a.n_head, a.head_dim), att.reshape(T, a.n_head, a.head_dim)
        k3, v3 = k.reshape(T, a.n_head_kv, a.head_dim), v.reshape(T, a.n_head_kv, a.head_dim)
        rms_norm(x, blk.attn_norm, self.eps, xn)
        self._matrix(i, "attn_q", blk.attn_q, xn, q)
        self._matrix(i, "attn_k", blk.attn_k, xn, k)
        self._matrix(i, "attn_v", blk.attn_v, xn, v)
        rope(q3, k3, pos, self.cos, self.sin)
        # the f16 cache [n_kv, n_ctx, hd], as llama.cpp's: values beyond f16's range become inf there
        # too (damaged weights: the sampler reports the NaN logits)
        with np.errstate(over="ignore"):
            s.k_cache[i][:, pos:pos + T] = k3.transpose(1, 0, 2)
            s.v_cache[i][:, pos:pos + T] = v3.transpose(1, 0, 2)
        # the kernel reads the f16 bits (numba has no float16 on the CPU)
        attention(q3, s.k_cache[i].view(np.uint16), s.v_cache[i].view(np.uint16), pos, att3, s.scores)
        self._matrix(i, "attn_output", blk.attn_output, att, y)
        x += y

    def _matrix(self, i: int, name: str, matrix, x: np.ndarray, out: np.ndarray) -> None:
        if self.inputs is None:
            matrix(x, out)
        else:
            self.inputs(i, name, matrix, x, out)

    def _step(self, tokens: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        s, T = self.s, len(tokens)
        x, xn, y = s.x[:T], s.xn[:T], s.y[:T]
        self.w.token_embd.rows(tokens, x)
        for i, blk in enumerate(self.w.blk):
            if T == 1 and (self.inputs is None or self.inputs.fused):
                self.attention_decoders[i](x, pos)
            else:
                self._attention(i, blk, pos, T)
                self.attention_decoders[i].upload_rows(pos, pos + T)  # a GPU decoder's copy of the cache
            # FFN: rmsnorm, then the FFN strategy (dense or sparse), residual
            rms_norm(x, blk.ffn_norm, self.eps, xn)
            self.ffn(i, blk, x, xn, y)
            x += y
        last = x if all_logits else x[T - 1:]
        rms_norm(last, self.w.output_norm, self.eps, xn[:len(last)])
        logits = s.logits[:len(last)]
        self.w.output(xn[:len(last)], logits)
        return logits


def load_model(path: str | Path, n_ctx: int | None = None,
               ffn_act: FFNActivation | None = None) -> tuple[GGUFFile, Transformer]:
    """Open a GGUF file and build the model; n_ctx defaults to min(4096, the model's context length)."""
    gguf = GGUFFile(path)
    args = ModelArgs.from_metadata(gguf.metadata, ffn_act)
    weights = load_weights(gguf, args)
    return gguf, Transformer(args, weights, n_ctx or min(4096, args.n_ctx_train))

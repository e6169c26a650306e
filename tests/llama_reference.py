"""A plain NumPy llama forward pass, independent of the engine: gguf's own reader and dequantization,
whole sequence at once, no cache. The oracle for the engine's logits and FFN activations.

It keeps the engine's documented numerics, which are llama.cpp's: keys and values rounded to f16,
mat-vec inputs rounded to the weight type's dot-product type."""

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, dequantize, quantize


def round_input(x, qtype):
    """x as ggml rounds a mat-vec input for weights of qtype (its vec_dot_type)."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        return dequantize(quantize(x.astype(np.float32), Q.Q8_0), Q.Q8_0).reshape(x.shape)
    if qtype == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    if qtype == Q.Q6_K:  # Q8_K: signed f32 scale per 256, q = rint(x * -127 / x_at_max|x|)
        xb = x.reshape(-1, 256)
        vmax = np.take_along_axis(xb, np.abs(xb).argmax(-1)[:, None], -1)
        inv = np.where(vmax != 0, -127.0 / np.where(vmax != 0, vmax, 1), 0).astype(np.float32)
        q = np.minimum(np.rint(xb * inv), 127)
        return (q * np.where(inv != 0, 1 / np.where(inv != 0, inv, 1), 0).astype(np.float32)).reshape(x.shape)
    return x


class ReferenceLlama:
    def __init__(self, path, activation: str = "relu"):
        r = GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
        self.types = {t.name: t.tensor_type for t in r.tensors}
        self.w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            [int(d) for d in reversed(t.shape)]) for t in r.tensors}
        self.n_layer = meta["llama.block_count"]
        self.n_head = meta["llama.attention.head_count"]
        self.n_kv = meta.get("llama.attention.head_count_kv", self.n_head)
        self.eps = meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)
        self.base = meta.get("llama.rope.freq_base", 10000.0)
        self.activation = activation
        self.w.setdefault("output.weight", self.w["token_embd.weight"])
        self.types.setdefault("output.weight", self.types["token_embd.weight"])

    def linear(self, x, name):
        return round_input(x, self.types[name]) @ self.w[name].T

    def norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x):  # x [T, heads, hd], adjacent pairs rotated
        T, _, hd = x.shape
        angle = np.arange(T)[:, None] * self.base ** (-np.arange(0, hd, 2) / hd)[None, :]
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = x.copy()
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    def forward(self, tokens):
        """Logits [T, n_vocab] and the FFN activations act(gate) per layer, each [T, n_ff]."""
        w, T = self.w, len(tokens)
        x = w["token_embd.weight"][tokens]
        acts = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            h = self.norm(x, w[p + "attn_norm.weight"])
            q = self.linear(h, p + "attn_q.weight").reshape(T, self.n_head, -1)
            k = self.linear(h, p + "attn_k.weight").reshape(T, self.n_kv, -1)
            v = self.linear(h, p + "attn_v.weight").reshape(T, self.n_kv, -1)
            q, k = self.rope(q), self.rope(k)
            k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)  # f16 cache
            rep = self.n_head // self.n_kv
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
            s = s + np.triu(np.full((T, T), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(T, -1)
            x = x + self.linear(o, p + "attn_output.weight")
            h = self.norm(x, w[p + "ffn_norm.weight"])
            g = self.linear(h, p + "ffn_gate.weight")
            a = np.maximum(g, 0) if self.activation == "relu" else g / (1 + np.exp(-g))
            acts.append(a)
            x = x + self.linear(a * self.linear(h, p + "ffn_up.weight"), p + "ffn_down.weight")
        return self.linear(self.norm(x, w["output_norm.weight"]), "output.weight"), acts

"""HybridFFN's fast side on a CUDA GPU: each layer's hot block in device memory, in the GGUF blocks
the CPU copies hold, and per decode step one asynchronous kernel launch (kernels/cuda.py's
sparse_ffn) whose result comes back while the CPU computes the cold neurons; and the attention of
the layers the placement puts there (cuda.AttentionDecoder, 3 launches a token, the KV cache in
device memory). The residual stream still comes back to the CPU after each attention block: the
predictor and the cold neurons read it there.

numba-cuda is imported only here and only when asked for, so the CPU path needs no CUDA package.
"""

import numba
import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.kernels.ops import DOT_ROUNDING, round_for_dot
from hybridinfer.loader import Block, Matrix, ModelArgs


def _cuda():
    """kernels.cuda, which imports numba-cuda when it is installed."""
    from hybridinfer.kernels import cuda
    return cuda


def gpu_visible() -> bool:
    """A real GPU with numba-cuda to drive it (the CUDA simulator does not count)."""
    return not numba.config.ENABLE_CUDASIM and _cuda().available() is None


def free_memory() -> int:
    return _cuda().free_memory()


class CUDASide:
    """The hot blocks on the GPU; start() launches a layer's hot part, finish() adds it to out."""

    name = "cuda"

    def __init__(self, args: ModelArgs):
        cuda = _cuda()
        reason = cuda.available()
        if reason:
            raise HybridInferError(f"--device cuda: {reason}")
        self.cuda, self.args = cuda, args
        self.stream = cuda.stream()
        self.blocks = []  # per layer: (gate_up, down) DeviceMatrix, or None for a layer with no hot neuron
        self.kind, self.threshold = 0, 0.0
        self.buffers = None  # device scratch, input and output, made with the first hot block
        self.attention_bytes = 0  # of the layers attach() put here

    @staticmethod
    def scratch_bytes(args: ModelArgs) -> int:
        """Device bytes of the buffers: the kernel's scratch for n_ff neurons, x, idx and out."""
        return _cuda().FFNScratch.bytes_for(args.n_embd, args.n_ff) + 4 * (2 * args.n_embd + args.n_ff)

    def layer_bytes(self, blocks: list[Block], args: ModelArgs, n_ctx: int) -> list[int | None]:
        """Per layer, the device bytes of its attention (weights, norm, RoPE tables, f16 KV cache at
        n_ctx, scratch: cuda.AttentionDecoder), None where a weight's type has no CUDA kernel or the
        rows are wider than its shared memory holds."""
        cuda = self.cuda
        sizes = []
        for blk in blocks:
            weights = (blk.attn_q, blk.attn_k, blk.attn_v, blk.attn_output)
            if any(w.qtype not in cuda.SUPPORTED_TYPES for w in weights) or args.n_embd > cuda.MAX_ATTENTION_EMBD:
                sizes.append(None)
                continue
            sizes.append(cuda.AttentionDecoder.bytes_for(*(w.data.nbytes for w in weights), args.n_embd, args.n_head,
                                                         args.n_head_kv, n_ctx, args.head_dim, args.rope_dim // 2))
        return sizes

    def attach(self, model, layers: int) -> None:
        """Run the attention of the model's first layers on the GPU: their decoders become the CUDA
        twins, over the same weights, RoPE tables and (mirrored) KV cache rows."""
        for i, blk in enumerate(model.w.blk[:layers]):
            model.attention_decoders[i] = self.cuda.AttentionDecoder(
                blk.attn_norm, model.eps, blk.attn_q.operand, blk.attn_k.operand, blk.attn_v.operand,
                blk.attn_output.operand, model.args.n_head, model.cos, model.sin, model.s.k_cache[i],
                model.s.v_cache[i], stream=self.stream)
            self.attention_bytes += model.attention_decoders[i].nbytes

    def load(self, gate_up: Matrix, down: Matrix, act_kind: int, act_threshold: float) -> None:
        """Append the next layer's hot block, copied to the device."""
        self.kind, self.threshold = act_kind, act_threshold
        if not gate_up.n_out:
            self.blocks.append(None)
            return
        if self.buffers is None:
            cuda, a = self.cuda, self.args
            self.buffers = _Buffers(cuda, a.n_embd, a.n_ff)
        self.blocks.append((self.cuda.to_device(gate_up.qtype, gate_up.data),
                            self.cuda.to_device(down.qtype, down.data)))

    @property
    def nbytes(self) -> int:
        """Device bytes this side allocated."""
        weights = sum(g.nbytes + d.nbytes for g, d in filter(None, self.blocks))
        return self.attention_bytes + weights + (self.buffers.nbytes if self.buffers else 0)

    def start(self, layer: int, idx: np.ndarray, x: np.ndarray) -> None:
        """Copy x and the block positions idx in, launch the layer's hot part; returns at once."""
        b = self.buffers
        n = len(idx)
        gate_up, down = self.blocks[layer]
        # the CPU kernels round x to 8-bit blocks themselves (integer dots); the GPU takes it rounded
        round_for_dot(DOT_ROUNDING[gate_up.qtype], x[None], b.x_host[None])
        b.idx_host[:n] = idx
        b.x.copy_to_device(b.x_host, stream=self.stream)
        b.idx[:n].copy_to_device(b.idx_host[:n], stream=self.stream)
        self.cuda.sparse_ffn(gate_up, down, self.kind, self.threshold, b.idx, n, b.x, b.out, b.scratch,
                             stream=self.stream)
        b.out.copy_to_host(b.out_host, stream=self.stream)

    def finish(self, out: np.ndarray) -> None:
        """Wait for the launch, then out += its result."""
        self.stream.synchronize()
        out += self.buffers.out_host


class _Buffers:
    """Device buffers of one decode step and their pinned host twins (pinned: asynchronous copies)."""

    def __init__(self, cuda, n_embd: int, n_ff: int):
        self.scratch = cuda.FFNScratch(n_embd, n_ff)
        self.x_host, self.out_host = (cuda.pinned_array(n_embd, np.float32) for _ in range(2))
        self.idx_host = cuda.pinned_array(n_ff, np.int32)
        self.x, self.out = (cuda.device_array(n_embd, np.float32) for _ in range(2))
        self.idx = cuda.device_array(n_ff, np.int32)

    @property
    def nbytes(self) -> int:
        return self.scratch.nbytes + self.x.nbytes + self.out.nbytes + self.idx.nbytes

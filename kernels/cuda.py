"""CUDA twins of the FFN weight kernels (numba-cuda), over the same raw GGUF blocks as the CPU ones.

A weight matrix is uploaded as it lies in the file (``to_device``: uint8 [n_out, row_bytes], blocks
of F32, F16, Q8_0, Q4_0 or Q4_1) and decoded where it lies, a value or a 32-value block at a time:
nothing dequantises a whole matrix. Inputs x arrive rounded by the host as the CPU kernels round
them (ops.round_for_dot with ops.DOT_ROUNDING[qtype]); the GPU takes float dot products of the
decoded weights with them, so results equal the CPU kernels' to float rounding.

Every launch is asynchronous on the given stream and deterministic: each sum runs in a fixed
order (shared-memory tree reductions, no float atomics). The host wrappers check every argument,
since the kernels check nothing; they take device arrays only, so that no call copies behind the
caller's back. ``launches()`` counts kernel launches, for launches per token.

Importing this module needs no numba-cuda: ``available()`` says why the kernels cannot run. Tests
run it under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1: no driver, one Python thread per
CUDA thread), hence the small thread count there.
"""

import dataclasses
import functools
import math
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from hybridinfer import kernels
from hybridinfer.kernels import _matrix as _host_matrix, _weight
from hybridinfer.kernels.ops import (DRELU, FATRELU, RELU, ROUND_BF16, ROUND_F16, ROUND_NONE, ROUND_Q8_0, ROUND_Q8_K,
                                     SILU)

try:
    from numba import config as _numba_config, cuda
    from numba.cuda.types import float32 as _FLOAT32  # dynamic shared arrays: the simulator takes no np.float32
    _IMPORT_ERROR = None
except ImportError as e:  # numba-cuda missing, or cuda-bindings, which it needs even in the simulator
    cuda, _IMPORT_ERROR = None, e

SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1})

# Launch configuration, in one place. THREADS per block, a power of two and a multiple of the
# 32-thread warp: 128 on a GPU, 32 in the simulator (about 2 ms of Python per simulated thread).
# matvec: ROWS rows per block; sparse_ffn: NEURONS neurons per block (2 * NEURONS dot products,
# reduced together in one tree), each block writing its share of down to its own row of scratch.
_SIMULATED = cuda is not None and bool(_numba_config.ENABLE_CUDASIM)
THREADS = 32 if _SIMULATED else 128
NEURONS = 4
ROWS = 2 * NEURONS
# AttentionDecoder: its mat-vecs take GROUP rows per block-iteration and its kernels loop over
# their work in at most MAX_BLOCKS blocks (grid-stride). The simulator pays per block and per
# barrier, not per row: one block of 32 rows there, the full grid of ROWS-row blocks on a GPU.
# Its q/k/v kernel keeps the block's rounded input in shared memory beside its dots and reduction
# row: a block may have 48 KiB of shared memory without opting in to more, which bounds n_embd.
GROUP = 32 if _SIMULATED else ROWS
MAX_BLOCKS = 1 if _SIMULATED else 1 << 20
SHARED_BYTES = 48 * 1024
MAX_ATTENTION_EMBD = (SHARED_BYTES - 4 * (GROUP + 1) * THREADS) // 4

_F32, _F16, _Q8_0, _Q4_0, _Q4_1 = (int(t) for t in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1))
_launches = 0


def available() -> str | None:
    """None when the kernels can run (a CUDA GPU, or the simulator), else the reason in one line."""
    if cuda is None:
        return f"numba-cuda is not installed ({_IMPORT_ERROR}): pip install 'hybridinfer[gpu]'"
    if not cuda.is_available():
        return "no CUDA GPU is visible: check nvidia-smi and the driver, or set NUMBA_ENABLE_CUDASIM=1 to simulate one"
    return None


def free_memory() -> int:
    """Bytes free on the device. The simulator keeps its arrays in host memory and reports infinity,
    so there it is the host's available memory."""
    if _SIMULATED:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(cuda.current_context().get_memory_info()[0])


def stream():
    """A new CUDA stream, for launches and copies that overlap the CPU's work."""
    return cuda.stream()


def device_array(n: int, dtype):
    """An uninitialised device array of n values."""
    return cuda.device_array(n, dtype)


def pinned_array(n: int, dtype):
    """A page-locked host array of n values: copies to and from it on a stream are asynchronous."""
    return cuda.pinned_array(n, dtype)


def launches() -> int:
    """Kernel launches made by this module so far."""
    return _launches


@dataclasses.dataclass(frozen=True)
class DeviceMatrix:
    """A weight matrix on the device: data uint8 [n_out, row_bytes] of qtype blocks, as in the file."""
    qtype: Q
    data: object
    n_in: int
    n_out: int

    @property
    def nbytes(self) -> int:
        return self.data.shape[0] * self.data.shape[1]


class FFNScratch:
    """Device buffers of sparse_ffn for up to max_neurons neurons of n_embd-wide rows: each block's
    share of down (partial f32 [blocks, n_embd]) and the count of blocks done (counter int32[1],
    zero between calls). One scratch per stream: two launches in flight must not share it."""

    def __init__(self, n_embd: int, max_neurons: int):
        if n_embd < 1 or max_neurons < 0:
            raise ValueError(f"FFNScratch needs n_embd >= 1 and max_neurons >= 0, got {n_embd} and {max_neurons}")
        self.n_embd, self.max_neurons = n_embd, max_neurons
        self.partial = cuda.device_array((_blocks(max_neurons), n_embd), np.float32)
        self.counter = cuda.to_device(np.zeros(1, np.int32))

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.n_embd, self.max_neurons)

    @staticmethod
    def bytes_for(n_embd: int, max_neurons: int) -> int:
        """Device bytes of an FFNScratch(n_embd, max_neurons), before allocating it."""
        return 4 * _blocks(max_neurons) * n_embd + 4


def to_device(qtype: Q, w: np.ndarray) -> DeviceMatrix:
    """Upload the GGUF blocks w (uint8 [n_out, row_bytes], checked as the CPU kernels check it)."""
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(f"quant type {getattr(qtype, 'name', qtype)!r} has no CUDA kernel (supported: {supported})")
    n_in = _weight(qtype, w)
    return DeviceMatrix(Q(qtype), cuda.to_device(w), n_in, w.shape[0])


def matvec(m: DeviceMatrix, x_dev, out_dev, stream=0) -> None:
    """out[n_out] f32 = W @ x[n_in] f32, one launch; device arrays, x rounded as m.qtype takes it."""
    global _launches
    _matrix(m, "m")
    _device(x_dev, (m.n_in,), np.float32, "x", "m.n_in")
    _device(out_dev, (m.n_out,), np.float32, "out", "m.n_out")
    if out_dev is x_dev:
        raise ValueError("out is x: the kernel writes out while reading x; use separate buffers")
    _matvec_for(int(m.qtype))[_cdiv(m.n_out, ROWS), THREADS, stream](m.data, x_dev, out_dev)
    _launches += 1


def sparse_ffn(gate_up: DeviceMatrix, down: DeviceMatrix, act_kind: int, act_threshold: float, idx_dev,
               n: int, x_dev, out_dev, scratch: FFNScratch, stream=0) -> None:
    """out[n_embd] = sum over the neurons k in idx[:n] of act(gate_k . x) * (up_k . x) * down[k]: the
    twin of kernels.sparse_ffn, in one launch (zeros for n == 0).

    gate_up [2 * n_hot, n_embd] with neuron k's gate row at 2k and up row at 2k + 1; down
    neuron-major [n_hot, n_embd]; idx_dev int32 device array, its first n entries ascending in
    [0, n_hot) (reading them on the host would cost a synchronisation: the kernel skips any outside
    that range instead of reading out of bounds); x_dev, out_dev f32[n_embd] device arrays."""
    global _launches
    _matrix(gate_up, "gate_up")
    _matrix(down, "down")
    n_embd, n_hot = down.n_in, down.n_out
    if gate_up.n_in != n_embd or gate_up.n_out != 2 * n_hot:
        raise ValueError(f"gate_up {gate_up.n_out} x {gate_up.n_in} does not match down {n_hot} x {n_embd}: "
                         f"expected [2 * n_hot, n_embd] and [n_hot, n_embd]")
    if act_kind not in (SILU, RELU, FATRELU, DRELU):
        raise ValueError(f"act_kind must be ops.SILU, RELU, FATRELU or DRELU, got {act_kind!r}")
    if not isinstance(scratch, FFNScratch) or scratch.n_embd != n_embd:
        raise ValueError(f"scratch must be an FFNScratch for n_embd {n_embd}, got {_describe(scratch)}")
    _device(idx_dev, (None,), np.int32, "idx", "any length")
    if not isinstance(n, (int, np.integer)) or not 0 <= n <= min(idx_dev.shape[0], scratch.max_neurons):
        raise ValueError(f"n must be an integer in [0, min(len(idx), scratch.max_neurons)] = "
                         f"[0, {min(idx_dev.shape[0], scratch.max_neurons)}], got {n!r}")
    _device(x_dev, (n_embd,), np.float32, "x", "n_embd")
    _device(out_dev, (n_embd,), np.float32, "out", "n_embd")
    if out_dev is x_dev:
        raise ValueError("out is x: the kernel writes out while reading x; use separate buffers")
    kernel = _sparse_ffn_for(int(gate_up.qtype), int(down.qtype))
    kernel[_blocks(n), THREADS, stream](gate_up.data, down.data, act_kind, np.float32(act_threshold), idx_dev, n,
                                        x_dev, out_dev, scratch.partial, scratch.counter)
    _launches += 1


class AttentionDecoder:
    """The twin of kernels.AttentionDecoder on the device: one layer's attention block for one token,
    x[1, n_embd] += attn_output(attention) of the token at pos, in three launches on its stream
    (RMSNorm, the q/k/v input rounding and q, k and v together; RoPE, the f16 cache write, causal
    GQA attention and the output's input rounding; the output projection and the residual).

    Takes the CPU decoder's arguments, checked by it: weights (qtype, rounding kind, uint8 blocks),
    host norm, cos, sin and the layer's HOST caches [n_head_kv, n_ctx, hd] f16, which a call keeps
    mirrored (the token's k and v row, rounded as the CPU rounds them) so that a CPU prefill can go on
    from them. The device keeps its own cache as f16 bits (uint16); upload_rows copies host rows
    written by the CPU to it. Each input is rounded on the device as the CPU rounds
    it for that weight type, so results equal the CPU decoder's to float rounding. Weight types
    without a CUDA kernel, and n_embd over MAX_ATTENTION_EMBD, raise ValueError: the caller keeps
    that layer on the CPU.
    """

    LAUNCHES = 3  # per call

    def __init__(self, norm, eps, wq, wk, wv, wo, n_head: int, cos, sin, k_cache, v_cache, stream=None):
        kernels.AttentionDecoder(norm, eps, wq, wk, wv, wo, n_head, cos, sin, k_cache, v_cache)  # the checks
        self.n_kv, self.n_ctx, self.hd = k_cache.shape
        self.n_embd, self.n_head = norm.shape[0], n_head
        if self.n_embd > MAX_ATTENTION_EMBD:
            raise ValueError(f"n_embd {self.n_embd} does not fit the q/k/v kernel's shared memory "
                             f"(at most {MAX_ATTENTION_EMBD}): keep this layer's attention on the CPU")
        self.k_cache, self.v_cache = k_cache, v_cache
        self._k_bits, self._v_bits = k_cache.view(np.uint16), v_cache.view(np.uint16)  # as the device's
        self.stream = cuda.stream() if stream is None else stream
        self.weights = tuple(to_device(w[0], w[2]) for w in (wq, wk, wv, wo))
        rounding = tuple(_input_rounding(w[0], w[1]) for w in (wq, wk, wv, wo))
        n_q, n_kvd = n_head * self.hd, self.n_kv * self.hd
        self.norm, self.cos, self.sin = (cuda.to_device(np.ascontiguousarray(a)) for a in (norm, cos, sin))
        self.eps = np.float32(eps)
        self.scale = np.float32(1.0 / np.sqrt(self.hd))  # as ops.attention computes it
        # device cache: f16 bits [n_kv, n_ctx, hd] each
        self.k_dev, self.v_dev = (cuda.device_array(k_cache.shape, np.uint16) for _ in range(2))
        # scratch: x [n_embd]; q|k|v [n_q + 2 n_kvd]; the token's k|v rows as f16 bits [2, n_kv, hd];
        # scores [n_head, n_ctx]; att and att rounded [n_q]; counter. The rounded inputs of q, k
        # and v live in each q/k/v block's shared memory.
        self.x = cuda.device_array(self.n_embd, np.float32)
        self.qkv = cuda.device_array(n_q + 2 * n_kvd, np.float32)
        self.kv_row = cuda.device_array((2, self.n_kv, self.hd), np.uint16)
        self.scores = cuda.device_array((n_head, self.n_ctx), np.float32)
        self.att, self.att_r = (cuda.device_array(n_q, np.float32) for _ in range(2))
        self.counter = cuda.to_device(np.zeros(1, np.int32))
        self.x_host = cuda.pinned_array(self.n_embd, np.float32)
        self.kv_host = cuda.pinned_array((2, self.n_kv, self.hd), np.uint16)
        self._qkv = _qkv_for(*(int(m.qtype) for m in self.weights[:3]), *rounding[:3])
        self._attend = _attend_for(rounding[3])
        self._output = _attn_output_for(int(self.weights[3].qtype))

    @property
    def nbytes(self) -> int:
        """Device bytes allocated: weights, norm, rope tables, the f16 caches and scratch."""
        wq, wk, wv, wo = self.weights
        return self.bytes_for(wq.nbytes, wk.nbytes, wv.nbytes, wo.nbytes, self.n_embd, self.n_head, self.n_kv,
                              self.n_ctx, self.hd, self.cos.shape[1])

    @staticmethod
    def bytes_for(q_bytes: int, k_bytes: int, v_bytes: int, output_bytes: int, n_embd: int, n_head: int,
                  n_head_kv: int, n_ctx: int, head_dim: int, rope_half: int) -> int:
        """Device bytes of an AttentionDecoder, before allocating it: the four weights' bytes as in the
        file (w.nbytes of each operand), norm, cos and sin [n_ctx, rope_half], k and v caches in f16,
        and scratch (the token's k and v rows in f16, the rest f32)."""
        n_q, n_kvd = n_head * head_dim, n_head_kv * head_dim
        tables = 4 * n_embd + 2 * 4 * n_ctx * rope_half
        caches = 2 * 2 * n_head_kv * n_ctx * head_dim
        scratch = 4 * (n_embd + n_q + 2 * n_kvd + n_head * n_ctx + 2 * n_q + 1) + 2 * 2 * n_kvd
        return q_bytes + k_bytes + v_bytes + output_bytes + tables + caches + scratch

    def __call__(self, x: np.ndarray, pos: int) -> None:
        global _launches
        _host_matrix(x, 1, self.n_embd, "x", "(1, n_embd)", writable=True)
        if not isinstance(pos, (int, np.integer)) or not 0 <= pos < self.n_ctx:
            raise ValueError(f"position {pos!r} is outside the cache of {self.n_ctx}")
        s, (wq, wk, wv, wo) = self.stream, self.weights
        self.x_host[:] = x[0]
        self.x.copy_to_device(self.x_host, stream=s)
        self._qkv[self._grid(wq.n_out + wk.n_out + wv.n_out, GROUP), THREADS, s, 4 * self.n_embd](
            self.x, self.norm, self.eps, wq.data, wk.data, wv.data, self.qkv)
        self._attend[self._grid(self.n_head, 1), THREADS, s](
            self.qkv, int(pos), self.cos, self.sin, self.scale, self.k_dev, self.v_dev, self.kv_row, self.scores,
            self.att, self.att_r, self.counter)
        self._output[self._grid(wo.n_out, GROUP), THREADS, s](wo.data, self.att_r, self.x)
        _launches += self.LAUNCHES
        self.x.copy_to_host(self.x_host, stream=s)
        self.kv_row.copy_to_host(self.kv_host, stream=s)
        s.synchronize()
        x[0] = self.x_host
        self._k_bits[:, pos] = self.kv_host[0]
        self._v_bits[:, pos] = self.kv_host[1]

    def upload_rows(self, start: int, stop: int) -> None:
        """Copy the host caches' rows [start, stop) of every KV head to the device cache (after a CPU
        prefill wrote them); returns when the copies are done."""
        if not 0 <= start <= stop <= self.n_ctx:
            raise ValueError(f"rows [{start}, {stop}) are not a range inside the cache of {self.n_ctx}")
        for host, dev in ((self._k_bits, self.k_dev), (self._v_bits, self.v_dev)):
            for h in range(self.n_kv if stop > start else 0):
                dev[h, start:stop].copy_to_device(host[h, start:stop], stream=self.stream)
        self.stream.synchronize()

    @staticmethod
    def _grid(n: int, per_block: int) -> int:
        return min(MAX_BLOCKS, _cdiv(n, per_block))


def _input_rounding(qtype, kind) -> int:
    """How the CPU decoder rounds the input of a weight: Q8_0 blocks for the types it takes integer
    dots with (whatever the kind says), else the given kind, ROUND_Q8_0 meaning none there."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        return ROUND_Q8_0
    return ROUND_NONE if kind == ROUND_Q8_0 else int(kind)


# ---- host-side checks ----------------------------------------------------------------------

def _matrix(m, name):
    if not isinstance(m, DeviceMatrix):
        raise ValueError(f"{name} must be a DeviceMatrix (cuda.to_device), got {_describe(m)}")


def _device(a, shape, dtype, name, size_name):
    if isinstance(a, np.ndarray) or not hasattr(a, "copy_to_host"):
        raise ValueError(f"{name} must be a device array (numba.cuda.to_device / device_array), got {_describe(a)}")
    if a.dtype != dtype or len(a.shape) != len(shape) or any(s not in (None, n) for s, n in zip(shape, a.shape)):
        expected = str(shape).replace("None", "n")
        raise ValueError(f"{name} must be a {np.dtype(dtype)} device array of shape {expected} ({size_name}), "
                         f"got {a.dtype} of shape {tuple(a.shape)}")


def _describe(a) -> str:
    return f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(n_neurons: int) -> int:
    """sparse_ffn's grid: one block per NEURONS neurons, at least one (which writes zeros)."""
    return max(1, _cdiv(n_neurons, NEURONS))


# ---- device code ---------------------------------------------------------------------------
# Defined only where numba.cuda imports; the format codes are compile-time constants of each
# kernel (one compile per format, as on the CPU), so the branches on them fold away.

if cuda is not None:
    @cuda.jit(device=True)
    def _ieee(bits, mant_bits, exp_bits):
        """The IEEE float (f16: 10, 5; f32: 23, 8) with these bits, by integer arithmetic: works
        the same on a GPU and in the simulator, with no reinterpreting cast."""
        mant = bits & ((1 << mant_bits) - 1)
        exp = (bits >> mant_bits) & ((1 << exp_bits) - 1)
        bias = (1 << (exp_bits - 1)) - 1
        if exp == (1 << exp_bits) - 1:
            v = np.float32(math.inf) if mant == 0 else np.float32(math.nan)
        elif exp == 0:  # subnormal
            v = math.ldexp(np.float32(mant), int(1 - bias - mant_bits))
        else:
            v = math.ldexp(np.float32(mant | (1 << mant_bits)), int(exp - bias - mant_bits))
        return np.float32(-v) if (bits >> (mant_bits + exp_bits)) & 1 else np.float32(v)

    @cuda.jit(device=True)
    def _half(w, r, o):
        """The f16 at bytes o, o + 1 of row r."""
        return _ieee(np.int32(w[r, o]) | (np.int32(w[r, o + 1]) << 8), 10, 5)

    @cuda.jit(device=True)
    def _value(fmt, w, r, i):
        """Value i of row r of w, blocks of type fmt."""
        if fmt == _F32:
            o = 4 * i
            bits = (np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8) | (np.int64(w[r, o + 2]) << 16)
                    | (np.int64(w[r, o + 3]) << 24))
            return _ieee(bits, 23, 8)
        if fmt == _F16:
            return _half(w, r, 2 * i)
        b, j = i // 32, i % 32
        if fmt == _Q8_0:
            q = np.int32(w[r, 34 * b + 2 + j])
            return _half(w, r, 34 * b) * np.float32(q - 256 if q >= 128 else q)
        o = 18 * b if fmt == _Q4_0 else 20 * b
        byte = np.int32(w[r, o + (2 if fmt == _Q4_0 else 4) + j % 16])
        q = np.float32(byte >> 4 if j >= 16 else byte & 15)
        if fmt == _Q4_0:
            return _half(w, r, o) * (q - np.float32(8.0))
        return _half(w, r, o) * q + _half(w, r, o + 2)

    @cuda.jit(device=True)
    def _row_dot(fmt, w, r, x, t):
        """Thread t's share of dot(row r of w, x): float values strided by THREADS (reads coalesced
        along the row); quantised blocks of 32 one per thread, their scale decoded once per block."""
        acc = np.float32(0.0)
        if fmt == _F32 or fmt == _F16:
            for i in range(t, x.shape[0], THREADS):
                acc += _value(fmt, w, r, i) * x[i]
            return acc
        size = 34 if fmt == _Q8_0 else 18 if fmt == _Q4_0 else 20
        first = 2 if fmt != _Q4_1 else 4  # first quant byte of a block
        for b in range(t, x.shape[0] // 32, THREADS):
            o, s, xsum = size * b, np.float32(0.0), np.float32(0.0)
            for j in range(32 if fmt == _Q8_0 else 16):
                q = np.int32(w[r, o + first + j])
                if fmt == _Q8_0:
                    s += np.float32(q - 256 if q >= 128 else q) * x[32 * b + j]
                else:
                    lo, hi = x[32 * b + j], x[32 * b + 16 + j]
                    s += np.float32(q & 15) * lo + np.float32(q >> 4) * hi
                    xsum += lo + hi
            d = _half(w, r, o)
            if fmt == _Q8_0:
                acc += d * s
            elif fmt == _Q4_0:
                acc += d * (s - np.float32(8.0) * xsum)
            else:
                acc += d * s + _half(w, r, o + 2) * xsum
        return acc

    @cuda.jit(device=True)
    def _reduce(dots, t):
        """dots[j, 0] = sum over threads of dots[j, :] for every row j, in a fixed tree order."""
        step = THREADS // 2
        while step > 0:
            cuda.syncthreads()
            if t < step:
                for j in range(dots.shape[0]):
                    dots[j, t] += dots[j, t + step]
            step //= 2
        cuda.syncthreads()

    @cuda.jit(device=True)
    def _gated(g, u, kind, threshold):
        """ops.gated on the device: act(g) * u for SILU, RELU or FATRELU (keeps g >= threshold),
        relu(g) * relu(u) for DRELU."""
        if kind == SILU:
            return g / (np.float32(1.0) + math.exp(-g)) * u
        if kind == RELU:
            return max(g, np.float32(0.0)) * u
        if kind == DRELU:
            return max(g, np.float32(0.0)) * max(u, np.float32(0.0))
        return (g if g >= threshold else np.float32(0.0)) * u

    @cuda.jit(device=True)
    def _last_block(counter, is_last, t):
        """True, in every thread of it, for the last block of the grid to get here, once every block's
        writes before it are visible (a fence, then the atomic count of blocks done in counter[0],
        which that block sets back to 0; is_last: a shared int32[1])."""
        cuda.threadfence()
        cuda.syncthreads()
        if t == 0:
            is_last[0] = 1 if cuda.atomic.add(counter, 0, 1) == cuda.gridDim.x - 1 else 0
            if is_last[0] == 1:  # every block has counted: zero for the next launch
                counter[0] = 0
        cuda.syncthreads()
        return is_last[0] == 1


@functools.cache
def _matvec_for(fmt: int):
    """matvec's kernel for weights of type fmt: one block per ROWS rows."""
    @cuda.jit
    def matvec_kernel(w, x, out):
        """out[n_out] f32 = W @ x; w uint8 [n_out, row_bytes]; x f32[n_in]."""
        t, first = cuda.threadIdx.x, cuda.blockIdx.x * ROWS
        dots = cuda.shared.array((ROWS, THREADS), np.float32)
        for j in range(ROWS):
            dots[j, t] = _row_dot(fmt, w, first + j, x, t) if first + j < out.shape[0] else np.float32(0.0)
        _reduce(dots, t)
        if t < ROWS and first + t < out.shape[0]:
            out[first + t] = dots[t, 0]
    return matvec_kernel


@functools.cache
def _sparse_ffn_for(gu_fmt: int, down_fmt: int):
    """sparse_ffn's kernel for gate_up of type gu_fmt and down of type down_fmt."""
    @cuda.jit
    def sparse_ffn_kernel(gate_up, down, act_kind, act_threshold, idx, n, x, out, partial, counter):
        """Block b: neurons idx[NEURONS * b:][:NEURONS] -> h by one tree reduction of their gate and
        up dots -> partial[b] = sum_j h_j * down[idx_j] (columns across threads, reads coalesced).
        The last block to finish (an atomic count of finished blocks, after a fence that publishes
        partial) sums partial over blocks in block order into out and resets the count."""
        t, blk = cuda.threadIdx.x, cuda.blockIdx.x
        first = blk * NEURONS
        dots = cuda.shared.array((ROWS, THREADS), np.float32)  # ROWS = 2 * NEURONS: a constant, as shapes must be
        h = cuda.shared.array(NEURONS, np.float32)
        rows = cuda.shared.array(NEURONS, np.int32)
        is_last = cuda.shared.array(1, np.int32)
        if t < NEURONS:
            k = idx[first + t] if first + t < n else -1
            rows[t] = k if 0 <= k < down.shape[0] else -1  # out of range: skipped, never read
        cuda.syncthreads()
        for j in range(2 * NEURONS):
            k = rows[j // 2]
            dots[j, t] = _row_dot(gu_fmt, gate_up, 2 * k + j % 2, x, t) if k >= 0 else np.float32(0.0)
        _reduce(dots, t)
        if t < NEURONS:
            h[t] = _gated(dots[2 * t, 0], dots[2 * t + 1, 0], act_kind, act_threshold)
        cuda.syncthreads()
        for c in range(t, out.shape[0], THREADS):
            s = np.float32(0.0)
            for j in range(NEURONS):
                if rows[j] >= 0 and h[j] != 0:
                    s += h[j] * _value(down_fmt, down, rows[j], c)
            partial[blk, c] = s
        if _last_block(counter, is_last, t):
            for c in range(t, out.shape[0], THREADS):
                s = np.float32(0.0)
                for b in range(cuda.gridDim.x):
                    s += partial[b, c]
                out[c] = s
    return sparse_ffn_kernel


# ---- AttentionDecoder's device code ----------------------------------------------------------

if cuda is not None:
    @cuda.jit(device=True)
    def _rint(v):
        """v rounded to the nearest integer, ties to even (np.rint), as a float64."""
        f = math.floor(v)
        r = v - f
        if r > 0.5 or (r == 0.5 and f % 2 != 0):
            f += 1
        return np.float64(f)

    @cuda.jit(device=True)
    def _round_mantissa(v, bits, min_exp):
        """ops._round_mantissa: v rounded to nearest-even with `bits` mantissa bits, no finer than
        2**(min_exp - bits - 1)."""
        if v == 0.0:
            return np.float32(0.0)
        _, e = math.frexp(v)
        ulp = math.ldexp(1.0, max(e, min_exp) - bits - 1)
        return np.float32(_rint(v / ulp) * ulp)

    @cuda.jit(device=True)
    def _round_q8_block(src, out, b, block, f16_scale):
        """ops._round_q8_blocks for the one block src[b:b + block]: out = d * min(127, rint(x * inv))."""
        amax, vmax = np.float32(0.0), np.float32(0.0)
        for i in range(b, b + block):
            if abs(src[i]) > amax:
                amax, vmax = abs(src[i]), src[i]
        d, inv = np.float32(0.0), np.float32(0.0)
        if amax != 0.0:
            if f16_scale:
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d
                d = _round_mantissa(d, 10, -13)
            else:
                inv = np.float32(-127.0) / vmax
                d = np.float32(1.0) / inv
        for i in range(b, b + block):
            out[i] = d * np.float32(min(127.0, _rint(src[i] * inv)))

    @cuda.jit(device=True)
    def _round_input(kind, src, out, t):
        """out = src rounded as the CPU rounds a mat-vec input of this kind (ops.round_for_dot); thread
        t's share: 8-bit blocks one per thread, else values strided by THREADS."""
        if kind == ROUND_Q8_0 or kind == ROUND_Q8_K:
            block = 32 if kind == ROUND_Q8_0 else 256
            for b in range(t, src.shape[0] // block, THREADS):
                _round_q8_block(src, out, b * block, block, kind == ROUND_Q8_0)
        else:
            for i in range(t, src.shape[0], THREADS):
                v = src[i]
                if kind == ROUND_F16:
                    v = _round_mantissa(v, 10, -13)
                elif kind == ROUND_BF16:
                    v = _round_mantissa(v, 7, -125)
                out[i] = v

    @cuda.jit(device=True)
    def _half_bits(v):
        """The f16 bits of v, a value f16 rounding keeps (magnitudes over 65504 become infinity)."""
        sign = 0x8000 if v < 0 else 0
        a = abs(v)
        if a == 0.0:
            return np.uint16(sign)
        if a > 65504.0:
            return np.uint16(sign | 0x7C00)
        m, e = math.frexp(a)
        if e + 14 >= 1:  # normal: a = (1 + mant / 1024) * 2**(e - 1)
            return np.uint16(sign | ((e + 14) << 10) | (int(m * 2048.0) - 1024))
        return np.uint16(sign | int(math.ldexp(a, 24)))

    @cuda.jit(device=True)
    def _cached(cache, kv, j, d):
        """Value d of row j of KV head kv of a cache of f16 bits."""
        return _ieee(np.int32(cache[kv, j, d]), 10, 5)

    @cuda.jit(device=True)
    def _roped(qkv, k, d, n_rot, pos, cos, sin):
        """Value d of the token's k head at offset k in qkv after RoPE at pos (ops.rope), f16-rounded
        as the cache keeps it."""
        v = qkv[k + d]
        if d < 2 * n_rot:
            i = d // 2
            x0, x1 = qkv[k + 2 * i], qkv[k + 2 * i + 1]
            v = x0 * cos[pos, i] - x1 * sin[pos, i] if d % 2 == 0 else x0 * sin[pos, i] + x1 * cos[pos, i]
        return _round_mantissa(v, 10, -13)

    @cuda.jit(device=True)
    def _group_dots(fmt, w, first, x, dots, t):
        """dots[j, 0] = dot(row first + j of w, x) for the GROUP rows from first (zeros past the end)."""
        for j in range(GROUP):
            dots[j, t] = _row_dot(fmt, w, first + j, x, t) if first + j < w.shape[0] else np.float32(0.0)
        _reduce(dots, t)

    @cuda.jit(device=True)
    def _block_reduce(red, t, is_max):
        """red[0] = the sum (or max) of red[:THREADS], in a fixed tree order; every thread returns it."""
        step = THREADS // 2
        while step > 0:
            cuda.syncthreads()
            if t < step:
                red[t] = max(red[t], red[t + step]) if is_max else red[t] + red[t + step]
            step //= 2
        cuda.syncthreads()
        v = red[0]
        cuda.syncthreads()  # before red is written again
        return v


@functools.cache
def _qkv_for(fq: int, fk: int, fv: int, rq: int, rk: int, rv: int):
    """AttentionDecoder's RMSNorm and q, k and v projections in one launch, for weights of types fq,
    fk, fv whose inputs are rounded as rq, rk, rv say."""
    @cuda.jit
    def qkv_kernel(x, norm, eps, wq, wk, wv, qkv):
        """qkv = [wq @ xq, wk @ xk, wv @ xv], where xq, xk, xv = rms_norm(x) * norm (ops.rms_norm's
        arithmetic) rounded for the q, k and v weights: the blocks take GROUP rows at a time of the
        three matrices in turn (grid-stride). Every block computes the norm itself, in the same
        fixed order (so all agree), and rounds it into its shared memory (dynamic, n_embd values)
        for the matrix at hand, again when it moves on to the next: no launch of its own, for a
        read of x and norm per block, from L2."""
        t, n = cuda.threadIdx.x, x.shape[0]
        dots = cuda.shared.array((GROUP, THREADS), np.float32)
        red = cuda.shared.array(THREADS, np.float32)
        xr = cuda.shared.array(0, _FLOAT32)
        ss = np.float32(0.0)
        for i in range(t, n, THREADS):
            ss += x[i] * x[i]
        red[t] = ss
        ss = _block_reduce(red, t, False)
        scale = np.float32(1.0) / math.sqrt(ss / n + eps)
        gq, gk = (wq.shape[0] + GROUP - 1) // GROUP, (wk.shape[0] + GROUP - 1) // GROUP
        held = -1  # the matrix (0, 1, 2: q, k, v) whose input xr holds
        for g in range(cuda.blockIdx.x, gq + 2 * gk, cuda.gridDim.x):
            m = 0 if g < gq else 1 if g < gq + gk else 2
            if m != held:  # the previous iteration's closing barrier ends every read of xr
                for i in range(t, n, THREADS):
                    xr[i] = x[i] * scale * norm[i]
                cuda.syncthreads()
                # in place: each thread rounds the values (or 8-bit blocks) it alone reads and writes
                if m == 0:
                    _round_input(rq, xr, xr, t)
                elif m == 1:
                    _round_input(rk, xr, xr, t)
                else:
                    _round_input(rv, xr, xr, t)
                cuda.syncthreads()
                held = m
            if m == 0:
                first, offset = g * GROUP, 0
                _group_dots(fq, wq, first, xr, dots, t)
                rows = wq.shape[0]
            elif m == 1:
                first, offset = (g - gq) * GROUP, wq.shape[0]
                _group_dots(fk, wk, first, xr, dots, t)
                rows = wk.shape[0]
            else:
                first, offset = (g - gq - gk) * GROUP, wq.shape[0] + wk.shape[0]
                _group_dots(fv, wv, first, xr, dots, t)
                rows = wv.shape[0]
            if t < GROUP and first + t < rows:
                qkv[offset + first + t] = dots[t, 0]
            cuda.syncthreads()  # before dots and xr are written again
    return qkv_kernel


@functools.cache
def _attend_for(ro: int):
    """AttentionDecoder's attention kernel, its output rounded as the output weight takes it (ro)."""
    @cuda.jit
    def attend_kernel(qkv, pos, cos, sin, scale, k_cache, v_cache, kv_row, scores, att, att_r, counter):
        """Block b, heads b, b + gridDim.x, ...: RoPE on its q head (in place in qkv), scores of q with
        the cached k rows 0..pos-1 and the token's own k (roped and f16-rounded here: every head of a
        group needs it, and no block waits for another), softmax with the max subtracted, att = the
        weighted sum of the v rows; the first head of each group writes the token's k and v (f16 bits)
        to the cache and to kv_row. The last block to finish rounds att into att_r."""
        t = cuda.threadIdx.x
        red = cuda.shared.array(THREADS, np.float32)
        is_last = cuda.shared.array(1, np.int32)
        n_head, n_kv, hd = att.shape[0] // k_cache.shape[2], k_cache.shape[0], k_cache.shape[2]
        n_rot, n_q = cos.shape[1], att.shape[0]
        for h in range(cuda.blockIdx.x, n_head, cuda.gridDim.x):
            kv = h // (n_head // n_kv)
            q, k, v = h * hd, n_q + kv * hd, n_q + n_kv * hd + kv * hd  # offsets in qkv
            for i in range(t, n_rot, THREADS):
                x0, x1 = qkv[q + 2 * i], qkv[q + 2 * i + 1]
                qkv[q + 2 * i] = x0 * cos[pos, i] - x1 * sin[pos, i]
                qkv[q + 2 * i + 1] = x0 * sin[pos, i] + x1 * cos[pos, i]
            if h % (n_head // n_kv) == 0:  # the token's k and v into the cache
                for d in range(t, hd, THREADS):
                    kd, vd = _roped(qkv, k, d, n_rot, pos, cos, sin), _round_mantissa(qkv[v + d], 10, -13)
                    kv_row[0, kv, d] = k_cache[kv, pos, d] = _half_bits(kd)
                    kv_row[1, kv, d] = v_cache[kv, pos, d] = _half_bits(vd)
            cuda.syncthreads()
            peak = np.float32(-math.inf)
            for j in range(t, pos + 1, THREADS):
                acc = np.float32(0.0)
                for d in range(hd):
                    kd = _roped(qkv, k, d, n_rot, pos, cos, sin) if j == pos else _cached(k_cache, kv, j, d)
                    acc += qkv[q + d] * kd
                scores[h, j] = acc * scale
                peak = max(peak, scores[h, j])
            red[t] = peak
            peak = _block_reduce(red, t, True)
            total = np.float32(0.0)
            for j in range(t, pos + 1, THREADS):
                scores[h, j] = math.exp(scores[h, j] - peak)
                total += scores[h, j]
            red[t] = total
            total = _block_reduce(red, t, False)
            for d in range(t, hd, THREADS):
                o = np.float32(0.0)
                for j in range(pos + 1):
                    vd = _round_mantissa(qkv[v + d], 10, -13) if j == pos else _cached(v_cache, kv, j, d)
                    o += scores[h, j] / total * vd
                att[q + d] = o
            cuda.syncthreads()
        if _last_block(counter, is_last, t):
            _round_input(ro, att, att_r, t)
    return attend_kernel


@functools.cache
def _attn_output_for(fo: int):
    """AttentionDecoder's output projection and residual, for an output weight of type fo."""
    @cuda.jit
    def attn_output_kernel(wo, att_r, x):
        """x += wo @ att_r, GROUP rows at a time (grid-stride)."""
        t = cuda.threadIdx.x
        dots = cuda.shared.array((GROUP, THREADS), np.float32)
        for g in range(cuda.blockIdx.x, (wo.shape[0] + GROUP - 1) // GROUP, cuda.gridDim.x):
            _group_dots(fo, wo, g * GROUP, att_r, dots, t)
            if t < GROUP and g * GROUP + t < x.shape[0]:
                x[g * GROUP + t] += dots[t, 0]
            cuda.syncthreads()  # before dots is written again
    return attn_output_kernel

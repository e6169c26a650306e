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

from hybridinfer.kernels import _weight
from hybridinfer.kernels.ops import FATRELU, RELU, SILU

try:
    from numba import config as _numba_config, cuda
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
    if act_kind not in (SILU, RELU, FATRELU):
        raise ValueError(f"act_kind must be ops.SILU, RELU or FATRELU, got {act_kind!r}")
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
    def _act(g, kind, threshold):
        """ops.act on the device: SILU, RELU or FATRELU (keeps g >= threshold)."""
        if kind == SILU:
            return g / (np.float32(1.0) + math.exp(-g))
        if kind == RELU:
            return max(g, np.float32(0.0))
        return g if g >= threshold else np.float32(0.0)


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
            h[t] = _act(dots[2 * t, 0], act_kind, act_threshold) * dots[2 * t + 1, 0]
        cuda.syncthreads()
        for c in range(t, out.shape[0], THREADS):
            s = np.float32(0.0)
            for j in range(NEURONS):
                if rows[j] >= 0 and h[j] != 0:
                    s += h[j] * _value(down_fmt, down, rows[j], c)
            partial[blk, c] = s
        cuda.threadfence()
        cuda.syncthreads()
        if t == 0:
            is_last[0] = 1 if cuda.atomic.add(counter, 0, 1) == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if is_last[0] == 1:
            for c in range(t, out.shape[0], THREADS):
                s = np.float32(0.0)
                for b in range(cuda.gridDim.x):
                    s += partial[b, c]
                out[c] = s
            if t == 0:
                counter[0] = 0
    return sparse_ffn_kernel

"""kernels.cuda.AttentionDecoder against the CPU kernels.AttentionDecoder on the same weights: the
same x after every decode step, the host caches mirrored, rows uploaded after a CPU prefill. CI runs
it in numba's CUDA simulator (conftest), hence the tiny shapes; NUMBA_ENABLE_CUDASIM=0 runs it on a
real GPU."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from hybridinfer import kernels
from hybridinfer.kernels import cuda as kc
from hybridinfer.kernels import ops

pytestmark = pytest.mark.skipif(kc.available() is not None, reason=str(kc.available()))

# GQA (4 heads over 2 KV heads) and RoPE on 12 of the 16 values of a head
N_EMBD, N_HEAD, N_KV, HD, N_CTX, ROPE_HALF = 64, 4, 2, 16, 8, 6


def operand(qtype: Q, values: np.ndarray) -> tuple:
    """values f32 [n_out, n_in] as a Matrix.operand: (qtype, input rounding kind, uint8 blocks)."""
    if qtype == Q.F32:
        w = np.ascontiguousarray(values, np.float32).view(np.uint8)
    elif qtype == Q.F16:
        w = values.astype(np.float16).view(np.uint8)
    else:
        w = quantize(values, qtype)
    return qtype, ops.DOT_ROUNDING[qtype], w


class Layer:
    """Random weights of one layer (types per q, k, v, output), and fresh caches for each decoder."""

    def __init__(self, types, seed=0):
        rng = np.random.default_rng(seed)
        shapes = ((N_HEAD * HD, N_EMBD), (N_KV * HD, N_EMBD), (N_KV * HD, N_EMBD), (N_EMBD, N_HEAD * HD))
        self.weights = [operand(t, rng.standard_normal(s).astype(np.float32) * 0.3) for t, s in zip(types, shapes)]
        self.norm = (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32)
        angles = np.arange(N_CTX)[:, None] * 10000.0 ** (-np.arange(ROPE_HALF) / ROPE_HALF)
        self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        self.xs = rng.standard_normal((N_CTX, 1, N_EMBD)).astype(np.float32)

    def caches(self):
        return tuple(np.zeros((N_KV, N_CTX, HD), np.float16) for _ in range(2))

    def decoder(self, cls, caches=None, **kw):
        k, v = caches or self.caches()
        return cls(self.norm, 1e-5, *self.weights, N_HEAD, self.cos, self.sin, k, v, **kw)


def decode(dec, layer, positions):
    """x after each decode step at positions, from the layer's inputs."""
    out = []
    for p in positions:
        x = layer.xs[p].copy()
        dec(x, p)
        out.append(x)
    return out


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def cpu_caches(cpu):
    """The CPU decoder's f16 caches (its kernel takes their bits)."""
    return cpu._rest[2].view(np.float16), cpu._rest[3].view(np.float16)


def assert_caches(gpu, cpu):
    # to one f16 rounding of each value: the two sides' q/k/v differ by float rounding before it
    k, v = cpu_caches(cpu)
    np.testing.assert_allclose(gpu.k_cache, k, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(gpu.v_cache, v, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("types, steps", [
    ((Q.Q4_0,) * 4, N_CTX),                      # every position, the last one filling the cache
    ((Q.F32,) * 4, 3), ((Q.F16,) * 4, 3), ((Q.Q8_0,) * 4, 3),
    ((Q.Q8_0, Q.F16, Q.Q4_0, Q.F32), 3),         # each input rounded for its own weight
], ids=lambda v: "-".join(t.name for t in v) if isinstance(v, tuple) else str(v))
def test_decode_equals_cpu(types, steps):
    layer = Layer(types)
    cpu, gpu = layer.decoder(kernels.AttentionDecoder), layer.decoder(kc.AttentionDecoder)
    for p in range(steps):
        x_cpu, x_gpu = layer.xs[p].copy(), layer.xs[p].copy()
        cpu(x_cpu, p)
        gpu(x_gpu, p)
        assert_close(x_gpu, x_cpu)
        assert np.array_equal(gpu.k_cache[:, p + 1:], np.zeros_like(gpu.k_cache[:, p + 1:]))  # one row mirrored
    assert_caches(gpu, cpu)


def test_upload_rows_after_cpu_prefill():
    layer = Layer((Q.Q4_0,) * 4, seed=1)
    cpu = layer.decoder(kernels.AttentionDecoder)
    decode(cpu, layer, range(4))
    gpu = layer.decoder(kc.AttentionDecoder)
    gpu.k_cache[:], gpu.v_cache[:] = cpu_caches(cpu)
    gpu.upload_rows(0, 4)
    gpu.upload_rows(4, 4)  # an empty range copies nothing
    assert_close(decode(gpu, layer, [4])[0], decode(cpu, layer, [4])[0])
    assert_caches(gpu, cpu)


def test_deterministic_and_launches():
    layer = Layer((Q.Q8_0,) * 4, seed=2)
    runs = []
    for _ in range(2):
        dec = layer.decoder(kc.AttentionDecoder)
        before = kc.launches()
        runs.append(decode(dec, layer, range(2)))
        assert kc.launches() - before == 2 * kc.AttentionDecoder.LAUNCHES == 6
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_nbytes_equals_bytes_for():
    layer = Layer((Q.Q4_0, Q.Q8_0, Q.F16, Q.F32))
    dec = layer.decoder(kc.AttentionDecoder)
    wq, wk, wv, wo = (w[2].nbytes for w in layer.weights)
    expected = kc.AttentionDecoder.bytes_for(wq, wk, wv, wo, N_EMBD, N_HEAD, N_KV, N_CTX, HD, ROPE_HALF)
    arrays = (dec.norm, dec.cos, dec.sin, dec.k_dev, dec.v_dev, dec.x, dec.qkv, dec.kv_row,
              dec.scores, dec.att, dec.att_r, dec.counter, *(m.data for m in dec.weights))
    assert dec.nbytes == expected == sum(a.nbytes for a in arrays)


def test_bad_arguments():
    layer = Layer((Q.Q8_0,) * 4)
    dec = layer.decoder(kc.AttentionDecoder)
    with pytest.raises(ValueError, match="x must be"):
        dec(np.zeros((1, N_EMBD + 1), np.float32), 0)
    with pytest.raises(ValueError, match="x must be"):
        dec(np.zeros((1, N_EMBD), np.float64), 0)
    for pos in (-1, N_CTX):
        with pytest.raises(ValueError, match="outside the cache"):
            dec(np.zeros((1, N_EMBD), np.float32), pos)
    with pytest.raises(ValueError, match="not a range"):
        dec.upload_rows(3, N_CTX + 1)
    bf16 = Layer((Q.Q8_0,) * 4)
    bf16.weights[1] = (Q.BF16, ops.ROUND_BF16, np.zeros((N_KV * HD, 2 * N_EMBD), np.uint8))
    with pytest.raises(ValueError, match="BF16.*no CUDA kernel"):
        bf16.decoder(kc.AttentionDecoder)
    wide = N_EMBD * (kc.MAX_ATTENTION_EMBD // N_EMBD + 1)  # its input would not fit in shared memory
    weights = [operand(Q.F32, np.zeros(s, np.float32)) for s in
               ((N_HEAD * HD, wide), (N_KV * HD, wide), (N_KV * HD, wide), (wide, N_HEAD * HD))]
    with pytest.raises(ValueError, match=f"n_embd {wide} does not fit"):
        kc.AttentionDecoder(np.ones(wide, np.float32), 1e-5, *weights, N_HEAD, bf16.cos, bf16.sin, *bf16.caches())
    with pytest.raises(ValueError, match="attention q weight"):  # the CPU decoder's checks
        Layer((Q.Q8_0,) * 4).decoder(kc.AttentionDecoder, caches=(np.zeros((N_KV, N_CTX, HD + 16), np.float16),) * 2)

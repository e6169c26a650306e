"""The CUDA kernels (kernels/cuda.py) against NumPy on gguf's dequantisation and against the CPU
kernels. CI runs them in numba's CUDA simulator (conftest sets NUMBA_ENABLE_CUDASIM=1), where one
Python thread stands for each CUDA thread, hence the tiny shapes; NUMBA_ENABLE_CUDASIM=0 runs them
on a real GPU."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from hybridinfer import kernels
from hybridinfer.kernels import cuda as kc
from hybridinfer.kernels import ops, reference

pytestmark = pytest.mark.skipif(kc.available() is not None, reason=str(kc.available()))
if kc.cuda is not None:
    from numba import cuda

N_EMBD, N_HOT = 64, 6  # 6 neurons: two blocks of kc.NEURONS = 4, the second one partly filled
TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
SETS = {"none": [], "one": [0], "last": [N_HOT - 1], "all": list(range(N_HOT)), "some": [1, 2, 5]}


def blocks(values: np.ndarray, qtype: Q) -> np.ndarray:
    """values f32 [n, k] as uint8 [n, row_bytes] of qtype blocks."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, np.float32).view(np.uint8)
    if qtype == Q.F16:
        return values.astype(np.float16).view(np.uint8)
    return quantize(values, qtype)


def rounded(qtype: Q, x: np.ndarray) -> np.ndarray:
    """x as the CPU kernels round it for weights of qtype: what the host passes to the GPU."""
    out = np.empty((1, x.shape[0]), np.float32)
    ops.round_for_dot(ops.DOT_ROUNDING[qtype], x[None], out)
    return out[0]


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def ffn(request):
    """(qtype, gate_up blocks, down blocks, x rounded) of one format."""
    qtype, rng = request.param, np.random.default_rng(int(request.param))
    gate_up = rng.standard_normal((2 * N_HOT, N_EMBD)).astype(np.float32)
    down = rng.standard_normal((N_HOT, N_EMBD)).astype(np.float32)
    x = rounded(qtype, rng.standard_normal(N_EMBD).astype(np.float32))
    return qtype, blocks(gate_up, qtype), blocks(down, qtype), x


def reference_ffn(qtype, gate_up, down, kind, threshold, idx, x) -> np.ndarray:
    """The FFN over neurons idx in float64 NumPy, from gguf's dequantisation."""
    dots = reference.dequantize(qtype, gate_up).astype(np.float64) @ x
    gate, up = dots[0::2][idx], dots[1::2][idx]
    act = {ops.SILU: gate / (1 + np.exp(-gate)), ops.RELU: np.maximum(gate, 0), ops.DRELU: np.maximum(gate, 0),
           ops.FATRELU: np.where(gate >= threshold, gate, 0)}[kind]
    up = np.maximum(up, 0) if kind == ops.DRELU else up
    return (act * up) @ reference.dequantize(qtype, down).astype(np.float64)[idx]


def run_ffn(qtype, gate_up, down, kind, threshold, idx, x, n=None, out=None) -> np.ndarray:
    idx = np.asarray(idx, np.int32)
    out = out if out is not None else cuda.to_device(np.full(N_EMBD, np.nan, np.float32))  # proves it is written
    kc.sparse_ffn(kc.to_device(qtype, gate_up), kc.to_device(qtype, down), kind, threshold,
                  cuda.to_device(np.append(idx, np.int32(0))), len(idx) if n is None else n, cuda.to_device(x),
                  out, kc.FFNScratch(N_EMBD, N_HOT))
    return out.copy_to_host()


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_available_and_free_memory():
    assert kc.available() is None
    assert kc.free_memory() > 0


def test_matvec(ffn):
    qtype, gate_up, _, x = ffn
    out = cuda.device_array(2 * N_HOT, np.float32)
    kc.matvec(kc.to_device(qtype, gate_up), cuda.to_device(x), out)
    close(out.copy_to_host(), reference.dequantize(qtype, gate_up).astype(np.float64) @ x)


@pytest.mark.parametrize("name", SETS)
def test_sparse_ffn_equals_reference_and_cpu(ffn, name):
    qtype, gate_up, down, x = ffn
    idx = np.array(SETS[name], np.int32)
    got = run_ffn(qtype, gate_up, down, ops.SILU, 0.0, idx, x)
    cpu = np.empty(N_EMBD, np.float32)
    kernels.sparse_ffn((qtype, gate_up), (qtype, down), ops.SILU, 0.0, idx, x, cpu)
    close(got, reference_ffn(qtype, gate_up, down, ops.SILU, 0.0, idx, x))
    close(got, cpu)
    if not len(idx):
        assert not got.any()


@pytest.mark.parametrize("kind, threshold", [(ops.RELU, 0.0), (ops.FATRELU, np.float32(0.5)), (ops.SILU, 0.0),
                                             (ops.DRELU, 0.0)])
def test_activations(kind, threshold):
    qtype, rng = Q.Q4_0, np.random.default_rng(7)
    gate_up = blocks(rng.standard_normal((2 * N_HOT, N_EMBD)).astype(np.float32), qtype)
    down = blocks(rng.standard_normal((N_HOT, N_EMBD)).astype(np.float32), qtype)
    x, idx = rounded(qtype, rng.standard_normal(N_EMBD).astype(np.float32)), np.arange(N_HOT, dtype=np.int32)
    close(run_ffn(qtype, gate_up, down, kind, threshold, idx, x),
          reference_ffn(qtype, gate_up, down, kind, threshold, idx, x))


def test_deterministic_and_one_launch():
    qtype, rng = Q.Q8_0, np.random.default_rng(1)
    gate_up = blocks(rng.standard_normal((2 * N_HOT, N_EMBD)).astype(np.float32), qtype)
    down = blocks(rng.standard_normal((N_HOT, N_EMBD)).astype(np.float32), qtype)
    x, idx = rounded(qtype, rng.standard_normal(N_EMBD).astype(np.float32)), [0, 3, 4, 5]
    before = kc.launches()
    first = run_ffn(qtype, gate_up, down, ops.SILU, 0.0, idx, x)
    assert kc.launches() == before + 1
    assert first.tobytes() == run_ffn(qtype, gate_up, down, ops.SILU, 0.0, idx, x).tobytes()


def test_n_takes_a_prefix_and_bad_indices_are_skipped(ffn):
    qtype, gate_up, down, x = ffn
    want = run_ffn(qtype, gate_up, down, ops.SILU, 0.0, [1, 4], x)
    assert run_ffn(qtype, gate_up, down, ops.SILU, 0.0, [1, 4, 2], x, n=2).tobytes() == want.tobytes()
    assert run_ffn(qtype, gate_up, down, ops.SILU, 0.0, [1, 4, N_HOT, -1], x).tobytes() == want.tobytes()


def test_float_decoding_specials():
    """Subnormals, infinities, NaN and extremes decode exactly (x = 1, one value per row; -0 sums to 0)."""
    halves = np.array([0.0, -0.0, 2.0**-24, -(2.0**-24), 2.0**-14, 65504, -65504, np.inf, -np.inf, np.nan,
                       1.0, -1.5, 0.333], np.float16)
    singles = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, np.inf, -np.inf,
                        np.nan, 1.0, -1.5, 0.333], np.float32)
    for qtype, values in ((Q.F16, halves), (Q.F32, singles)):
        out = cuda.device_array(len(values), np.float32)
        kc.matvec(kc.to_device(qtype, values.view(np.uint8).reshape(len(values), -1)),
                  cuda.to_device(np.ones(1, np.float32)), out)
        np.testing.assert_array_equal(out.copy_to_host(), values.astype(np.float32))


def test_bad_arguments():
    qtype = Q.Q8_0
    gu = kc.to_device(qtype, blocks(np.ones((2 * N_HOT, N_EMBD), np.float32), qtype))
    down = kc.to_device(qtype, blocks(np.ones((N_HOT, N_EMBD), np.float32), qtype))
    x, out = cuda.to_device(np.ones(N_EMBD, np.float32)), cuda.device_array(N_EMBD, np.float32)
    idx, scratch = cuda.to_device(np.arange(N_HOT, dtype=np.int32)), kc.FFNScratch(N_EMBD, N_HOT)
    good = dict(gate_up=gu, down=down, act_kind=ops.RELU, act_threshold=0.0, idx_dev=idx, n=N_HOT, x_dev=x,
                out_dev=out, scratch=scratch)
    bad = [dict(x_dev=np.ones(N_EMBD, np.float32)),  # a host array
           dict(x_dev=cuda.to_device(np.ones(N_EMBD, np.float64))),
           dict(out_dev=cuda.device_array(N_EMBD + 1, np.float32)),
           dict(out_dev=x),
           dict(idx_dev=cuda.to_device(np.arange(N_HOT, dtype=np.int64))),
           dict(n=N_HOT + 1),
           dict(n=-1),
           dict(scratch=kc.FFNScratch(N_EMBD, 2)),
           dict(scratch=kc.FFNScratch(2 * N_EMBD, N_HOT)),
           dict(gate_up=down),
           dict(act_kind=7)]
    for change in bad:
        with pytest.raises(ValueError):
            kc.sparse_ffn(**{**good, **change})
    with pytest.raises(ValueError, match="no CUDA kernel"):
        kc.to_device(Q.Q6_K, np.zeros((1, 210), np.uint8))
    with pytest.raises(ValueError, match="block"):
        kc.to_device(Q.Q4_0, np.zeros((2, 19), np.uint8))
    with pytest.raises(ValueError, match="n_in"):
        kc.matvec(gu, cuda.to_device(np.ones(N_EMBD - 1, np.float32)), cuda.device_array(2 * N_HOT, np.float32))
    with pytest.raises(ValueError, match="DeviceMatrix"):
        kc.matvec((qtype, gu.data), x, cuda.device_array(2 * N_HOT, np.float32))


def test_on_a_stream_with_pinned_buffers():
    """The caller's pattern: pinned host buffers, copies and the launch queued on one stream."""
    qtype, rng = Q.F16, np.random.default_rng(3)
    gate_up = blocks(rng.standard_normal((2 * N_HOT, N_EMBD)).astype(np.float32), qtype)
    down = blocks(rng.standard_normal((N_HOT, N_EMBD)).astype(np.float32), qtype)
    stream, scratch = kc.stream(), kc.FFNScratch(N_EMBD, N_HOT)
    assert scratch.nbytes == kc.FFNScratch.bytes_for(N_EMBD, N_HOT) == 4 * 2 * N_EMBD + 4
    x_host, out_host, idx_host = (kc.pinned_array(n, t) for n, t in ((N_EMBD, np.float32), (N_EMBD, np.float32),
                                                                      (N_HOT, np.int32)))
    x, out, idx = (kc.device_array(a.shape[0], a.dtype) for a in (x_host, out_host, idx_host))
    x_host[:] = rounded(qtype, rng.standard_normal(N_EMBD).astype(np.float32))
    idx_host[:2] = [2, 4]
    x.copy_to_device(x_host, stream=stream)
    idx.copy_to_device(idx_host, stream=stream)
    kc.sparse_ffn(kc.to_device(qtype, gate_up), kc.to_device(qtype, down), ops.RELU, 0.0, idx, 2, x, out, scratch,
                  stream=stream)
    out.copy_to_host(out_host, stream=stream)
    stream.synchronize()
    close(out_host, reference_ffn(qtype, gate_up, down, ops.RELU, 0.0, [2, 4], x_host))

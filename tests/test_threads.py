"""Threads on a shared machine: kernel calls give up the threads whose cores other processes keep
busy (kernels/threads.py), and the count never changes a bit of any result."""

import os
from types import SimpleNamespace

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quantize

from hybridinfer import kernels
from hybridinfer.kernels import threads
from hybridinfer.kernels.ops import RELU

needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
rng = np.random.default_rng(0)


def blocks(qtype, n_out, n_in):
    return quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), qtype).view(np.uint8).reshape(n_out, -1)


@pytest.fixture
def fake_machine(monkeypatch):
    """Two CPUs whose busy seconds the test says: samples.append((machine busy s, our CPU s)); the
    clock stands still at 1000 s, so that only the test's own _look calls take samples."""
    samples = []
    monkeypatch.setattr(threads, "_CPUS", frozenset({0, 1}))
    monkeypatch.setattr(threads, "_sample", lambda now: (*samples.pop(0), now) if samples else None)
    monkeypatch.setattr(threads, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    before = kernels.get_threads()
    yield samples
    monkeypatch.undo()
    kernels.set_threads(before)


@needs_two
def test_calls_use_the_cores_others_leave_free(fake_machine):
    fake_machine.append((10.0, 1.0))
    kernels.set_threads(2)
    t0 = threads._next_look - threads.WINDOW
    fake_machine.append((10.4, 1.2))  # 0.2 s: we used 0.2 CPU s, others 0.2: one core busy
    threads._look(t0 + 0.2)
    assert (threads.team(), numba.get_num_threads(), kernels.get_threads()) == (1, 1, 2)
    fake_machine.append((10.76, 1.5))  # others used 0.06 CPU s in 0.2 s: 0.3 of a core, rounded to none
    threads._look(t0 + 0.4)
    assert (threads.team(), numba.get_num_threads()) == (2, 2)
    fake_machine.append((30.0, 1.5))  # much later: the window is too old to tell the load now
    threads._look(t0 + 60)
    assert threads.team() == 2
    fake_machine.append((30.4, 1.5))  # others keep both cores busy: still one thread, ours
    threads._look(t0 + 60.2)
    assert (threads.team(), numba.get_num_threads()) == (1, 1)
    kernels.set_threads(2)  # a new count starts over
    assert (threads.team(), numba.get_num_threads()) == (2, 2)


def test_one_thread_never_looks(fake_machine):
    kernels.set_threads(1)
    threads._next_look = 0.0
    fake_machine.extend([(0.0, 0.0)] * 3)
    assert threads.team() == 1
    assert len(fake_machine) == 3


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux only")
def test_busy_seconds_from_proc_stat():
    first = threads._sample(1.0)
    sum(range(3_000_000))  # burn some CPU
    second = threads._sample(2.0)
    assert first[0] <= second[0] and first[1] < second[1] and second[2] == 2.0


def _every_kernel():
    """Each facade kernel once on small made-up inputs; the outputs, copied."""
    n_embd, n_ff, rank = 96, 70, 32
    x = rng.standard_normal(n_embd).astype(np.float32)
    xs = rng.standard_normal((5, n_embd)).astype(np.float32)
    w, gate_up, down = blocks(Q.Q4_1, 301, n_embd), blocks(Q.Q8_0, 2 * n_ff, n_embd), blocks(Q.Q4_0, n_ff, n_embd)
    fc1, fc2 = blocks(Q.Q8_0, rank, n_embd), blocks(Q.Q8_0, n_ff, rank)
    rows = np.arange(0, n_ff, 3, dtype=np.int32)
    out = {"matvec": np.zeros(301, np.float32), "matmul": np.zeros((5, 301), np.float32),
           "get_rows": np.zeros((3, n_embd), np.float32), "gather": np.zeros(len(rows), np.float32),
           "axpy": np.zeros(n_embd, np.float32), "logits": np.zeros(n_ff, np.float32),
           "idx": np.zeros(n_ff, np.int32), "ffn": np.zeros(n_embd, np.float32)}
    kernels.matvec(Q.Q4_1, w, x, out["matvec"])
    kernels.matmul(Q.Q4_1, w, xs, out["matmul"])
    kernels.get_rows(Q.Q4_1, w, np.array([300, 0, 7]), out["get_rows"])
    kernels.gather_matvec(Q.Q8_0, gate_up, rows, x, out["gather"])
    kernels.sparse_axpy(Q.Q4_0, down, rows, rng.standard_normal(len(rows)).astype(np.float32), out["axpy"])
    n = kernels.mlp_select((Q.Q8_0, fc1), (Q.Q8_0, fc2), 0.0, x, np.empty(rank, np.float32), out["logits"], out["idx"])
    kernels.sparse_ffn((Q.Q8_0, gate_up), (Q.Q4_0, down), RELU, 0.0, out["idx"][:n], x, out["ffn"])
    return {k: v.copy() for k, v in out.items()}


@needs_two
def test_same_bits_on_one_thread_or_two(fake_machine):
    """Small calls too, which a busy machine might otherwise run on one thread only."""
    state = rng.bit_generator.state
    kernels.set_threads(1)
    alone = _every_kernel()
    rng.bit_generator.state = state
    kernels.set_threads(2)
    shared = _every_kernel()
    assert numba.get_num_threads() == 2
    for name in alone:
        assert np.array_equal(alone[name], shared[name]), name

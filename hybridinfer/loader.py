"""ModelArgs from GGUF metadata and the weights under their GGUF names, with the few fix-ups in one place."""

import json
import math
import sys
from dataclasses import dataclass, fields

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quantize

from hybridinfer import kernels
from hybridinfer.kernels import quant
from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import GGUFFile, TensorInfo, checked
from hybridinfer.kernels.ops import DOT_ROUNDING, ROUND_NONE, ROUND_Q8_0, round_for_dot
from hybridinfer.predictors.format import Fingerprint, fingerprint

ACTIVATIONS = ("silu", "relu", "fatrelu", "drelu")  # drelu: relu(gate) * relu(up) (TurboSparse, Bamboo)


@dataclass(frozen=True)
class FFNActivation:
    kind: str  # one of ACTIVATIONS
    threshold: float = 0.0  # fatrelu: values below it become 0

    @classmethod
    def parse(cls, spec: str) -> "FFNActivation":
        """'silu', 'relu', 'drelu' or 'fatrelu:T' (as given to --ffn-act), T a finite number >= 0."""
        kind, _, threshold = spec.partition(":")
        if kind not in ACTIVATIONS or (kind == "fatrelu") != bool(threshold):
            raise HybridInferError(f"unknown FFN activation '{spec}': expected silu, relu, drelu or fatrelu:T")
        try:
            value = float(threshold or 0.0)
        except ValueError:
            value = math.nan
        if not 0.0 <= value < math.inf:
            raise HybridInferError(f"FFN activation '{spec}': threshold '{threshold}' is not a finite number >= 0")
        return cls(kind, value)

    @property
    def sparse(self) -> bool:
        """Whether the activation leaves exact zeros that sparse FFN modes can skip."""
        return self.kind != "silu"

    def __str__(self) -> str:
        return f"fatrelu:{self.threshold:g}" if self.kind == "fatrelu" else self.kind


class _Metadata:
    """Typed, range-checked reads of the model's GGUF metadata (gguf_file.checked): a damaged or
    foreign value ends in one error naming the key, the value and what was expected, before anything
    is sized from it."""

    FIX = "the file is damaged or not a llama model this engine can run"

    def __init__(self, meta: dict):
        self.meta = meta

    def _get(self, key: str, check, expected: str, default):
        value = checked(self.meta, key, check, expected, self.FIX, default)
        if value is None:
            raise HybridInferError(f"GGUF metadata lacks '{key}': the file is incomplete")
        return value

    def int(self, key: str, low: int, high: int, default: int | None = None) -> int:
        return int(self._get(key, lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                             and low <= v <= high, f"an integer in [{low}, {high}]", default))

    def float(self, key: str, low: float, high: float, default: float | None = None, low_open: bool = True) -> float:
        """A finite number in (low, high], or [low, high] with low_open False."""
        def check(v) -> bool:
            return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                    and math.isfinite(v) and (low < v if low_open else low <= v) and v <= high)
        return float(self._get(key, check, f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]",
                               default))

    def str(self, key: str, default: str | None = None) -> str:
        return self._get(key, lambda v: isinstance(v, str), "a string", default)


# Bounds on sizes read from metadata: far above any llama model, low enough that nothing sized from them
# can overflow or ask for absurd memory before the relations below and the memory check have run.
MAX_LAYERS, MAX_EMBD, MAX_FF, MAX_HEADS, MAX_HEAD_DIM = 1024, 1 << 16, 1 << 20, 1024, 1024
MAX_CTX, MAX_VOCAB = 1 << 24, 1 << 22


@dataclass(frozen=True)
class ModelArgs:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    norm_eps: float
    n_ctx_train: int
    n_vocab: int
    ffn_act: FFNActivation

    @classmethod
    def from_metadata(cls, meta: dict, ffn_act: FFNActivation | None = None) -> "ModelArgs":
        """The model's sizes from GGUF metadata, every value type- and range-checked and the relations
        between them checked here, once (tensor shapes are checked against them by load_weights)."""
        m = _Metadata(meta)
        arch = meta.get("general.architecture")
        if arch != "llama":
            shown = f"'{arch}'" if isinstance(arch, str) else repr(arch)[:40]
            raise HybridInferError(f"architecture {shown} is not supported: hybridinfer runs llama-architecture "
                                   f"GGUF files")
        n_embd = m.int("llama.embedding_length", 1, MAX_EMBD)
        n_head = m.int("llama.attention.head_count", 1, MAX_HEADS)
        n_head_kv = m.int("llama.attention.head_count_kv", 1, n_head, n_head)
        if n_head % n_head_kv:
            raise HybridInferError(f"GGUF metadata: {n_head} attention heads cannot share {n_head_kv} KV heads "
                                   f"(not a divisor): the file is damaged")
        if "llama.attention.key_length" not in meta and n_embd % n_head:
            raise HybridInferError(f"GGUF metadata: embedding length {n_embd} is not a multiple of the head "
                                   f"count {n_head} and no llama.attention.key_length is given: the file is damaged")
        head_dim = m.int("llama.attention.key_length", 1, MAX_HEAD_DIM, n_embd // n_head)
        m.int("llama.attention.value_length", head_dim, head_dim, head_dim)  # the cache assumes equal sizes
        rope_dim = m.int("llama.rope.dimension_count", 2, head_dim, head_dim)
        if rope_dim % 2:
            raise HybridInferError(f"GGUF metadata 'llama.rope.dimension_count' is {rope_dim}, expected an even "
                                   f"number (RoPE rotates pairs): the file is damaged")
        if m.str("llama.rope.scaling.type", "none") != "none":
            raise HybridInferError(f"RoPE scaling '{meta['llama.rope.scaling.type']}' is not supported")
        tokens = meta.get("tokenizer.ggml.tokens", ())
        if ffn_act is None:
            act = m.str("hybridinfer.ffn_activation", "silu")
            if act == "fatrelu":
                act = f"fatrelu:{m.float('hybridinfer.ffn_act_threshold', 0.0, 1e30, 0.0, low_open=False)!r}"
            ffn_act = FFNActivation.parse(act)
        return cls(
            n_layer=m.int("llama.block_count", 1, MAX_LAYERS), n_embd=n_embd,
            n_ff=m.int("llama.feed_forward_length", 1, MAX_FF), n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, rope_dim=rope_dim, rope_base=m.float("llama.rope.freq_base", 0.0, 1e12, 10000.0),
            norm_eps=m.float("llama.attention.layer_norm_rms_epsilon", 0.0, 1.0, 1e-5),
            n_ctx_train=m.int("llama.context_length", 1, MAX_CTX),
            n_vocab=m.int("llama.vocab_size", 1, MAX_VOCAB, len(tokens) if hasattr(tokens, "__len__") else 0),
            ffn_act=ffn_act)


_scratch = np.empty(0, np.float32)  # the rounded input of the current mat-vec (calls never nest)


def round_input(qtype: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    """x as ggml rounds it before a dot product with weights of qtype (see kernels.ops.DOT_ROUNDING);
    the kernels quantise it themselves to Q8_0 blocks for their integer dot products."""
    global _scratch
    kind = DOT_ROUNDING[qtype]
    if kind in (ROUND_NONE, ROUND_Q8_0):
        return x
    if _scratch.size < x.size:
        _scratch = np.empty(x.size, np.float32)
    out = _scratch[:x.size].reshape(x.shape)
    round_for_dot(kind, x, out)
    return out


@dataclass
class Matrix:
    """A weight matrix W[n_out, n_in] in its GGUF blocks; called as ``W(x, out)`` for x[T, n_in].

    Inputs are rounded as llama.cpp rounds them (8-bit blocks for quantised weights, f16 for F16),
    so that results follow llama.cpp's on the same file.
    """

    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 (n_out, row_bytes)
    n_in: int
    n_out: int

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        x = round_input(self.qtype, x)
        if len(x) == 1:
            kernels.matvec(self.qtype, self.data, x[0], out[0])
        else:
            kernels.matmul(self.qtype, self.data, x, out)

    @property
    def operand(self) -> tuple[GGMLQuantizationType, int, np.ndarray]:
        """(qtype, input rounding kind, blocks): the matrix as kernels.AttentionDecoder takes it."""
        return self.qtype, DOT_ROUNDING[self.qtype], self.data

    def gather(self, rows: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[n] = W[rows] @ x for one token x[1, n_in]: rows int32[n]."""
        kernels.gather_matvec(self.qtype, self.data, rows, round_input(self.qtype, x)[0], out)

    def rows(self, ids: np.ndarray, out: np.ndarray) -> None:
        kernels.get_rows(self.qtype, self.data, ids, out)

    def values(self) -> np.ndarray:
        """W dequantised, f32 [n_out, n_in]."""
        return _values(self)


class _Derived(Matrix):
    """A matrix the file does not hold, made on first use from one it does: a sparse GGUF's dense
    ffn_gate, ffn_up and ffn_down (for --sparse off and exact; predicted decoding never makes them)."""

    def __init__(self, qtype: GGMLQuantizationType, n_in: int, n_out: int, make):
        self.qtype, self.n_in, self.n_out, self._make = qtype, n_in, n_out, make

    @property
    def data(self) -> np.ndarray:
        if self._make is not None:
            self._data, self._make = self._make(), None
        return self._data


@dataclass
class Block:
    attn_norm: np.ndarray  # f32 [n_embd]
    attn_q: Matrix  # [n_head * head_dim, n_embd]
    attn_k: Matrix  # [n_head_kv * head_dim, n_embd]
    attn_v: Matrix  # [n_head_kv * head_dim, n_embd]
    attn_output: Matrix  # [n_embd, n_head * head_dim]
    ffn_norm: np.ndarray  # f32 [n_embd]
    ffn_gate: Matrix  # [n_ff, n_embd]
    ffn_up: Matrix  # [n_ff, n_embd]
    ffn_down: Matrix  # [n_embd, n_ff]
    # the sparse layout where the file holds it (sparse_gguf): predicted decoding reads these in place
    ffn_gate_up: Matrix | None = None  # [2 * n_ff, n_embd], as interleaved_rows makes it
    ffn_down_t: Matrix | None = None  # [n_ff, n_embd], as neuron_major makes it


@dataclass
class Weights:
    token_embd: Matrix  # [n_vocab, n_embd]
    blk: list[Block]
    output_norm: np.ndarray  # f32 [n_embd]
    output: Matrix  # [n_vocab, n_embd]; token_embd when the file has no output.weight (tied)


FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)  # norm vectors


class _TensorLoader:
    """Turns GGUF tensors into Matrix / vector weights, checking every shape against ModelArgs."""

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.dequantized: dict[str, list[int]] = {}  # qtype name -> [tensor count, bytes added]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.gguf.tensors:
            raise HybridInferError(f"'{self.gguf.path}' lacks tensor {name}: not a complete llama model")
        return self.gguf.tensors[name]

    def vector(self, name: str, n: int) -> np.ndarray:
        t = self.tensor(name)
        if t.shape != (n,):
            raise HybridInferError(f"tensor {name} has shape {list(t.shape)}, expected [{n}]")
        if t.qtype not in FLOAT_TYPES:
            raise HybridInferError(f"tensor {name} is of type {t.qtype.name}, expected a float type "
                                   f"({', '.join(q.name for q in FLOAT_TYPES)}): the file is damaged")
        return dequantize(t.data.reshape(-1), t.qtype).astype(np.float32).reshape(n)

    def matrix(self, name: str, n_in: int, n_out: int) -> Matrix:
        t = self.tensor(name)
        if t.shape != (n_in, n_out):
            raise HybridInferError(f"tensor {name} has shape {list(t.shape)}, expected [{n_in}, {n_out}]")
        if t.qtype in kernels.SUPPORTED_TYPES:
            return Matrix(t.qtype, t.data, n_in, n_out)
        try:
            values = dequantize(t.data, t.qtype).astype(np.float32)
        except NotImplementedError:
            supported = ", ".join(sorted(q.name for q in kernels.SUPPORTED_TYPES))
            raise HybridInferError(f"tensor {name} is of quant type {t.qtype.name}, which hybridinfer cannot "
                                   f"read (supported: {supported}, and types the gguf package dequantizes)") from None
        count = self.dequantized.setdefault(t.qtype.name, [0, 0])
        count[0] += 1
        count[1] += values.nbytes - t.data.nbytes
        return Matrix(GGMLQuantizationType.F32, values.view(np.uint8), n_in, n_out)


SOURCE_FINGERPRINT = "hybridinfer.sparse.fingerprint"  # a converted file's: that of the model it came from


def model_fingerprint(gguf: GGUFFile, args: ModelArgs) -> Fingerprint:
    """What a predictor must have been trained for: architecture, sizes, tensor names and shapes. A
    sparse GGUF written by hybridinfer convert answers with its source model's (it is that model);
    the transposed ffn_down of PowerInfer's files counts as the ffn_down it is."""
    if SOURCE_FINGERPRINT in gguf.metadata:
        try:
            fp = Fingerprint.from_dict(json.loads(str(gguf.metadata[SOURCE_FINGERPRINT])), f"'{gguf.path}'")
        except ValueError as e:  # PredictorError, JSONDecodeError
            raise HybridInferError(f"'{gguf.path}': metadata {SOURCE_FINGERPRINT} is damaged ({e}): convert the "
                                   f"model again") from None
        if (fp.n_layer, fp.n_embd, fp.n_ff) != (args.n_layer, args.n_embd, args.n_ff):
            raise HybridInferError(f"'{gguf.path}': metadata {SOURCE_FINGERPRINT} describes another model: "
                                   f"convert the model again")
        return fp
    shapes = {}
    for name, t in gguf.tensors.items():
        if name.endswith(".ffn_down_t.weight"):
            shapes[name.replace(".ffn_down_t.", ".ffn_down.")] = t.shape[::-1]
        else:
            shapes[name] = t.shape
    return fingerprint(gguf.metadata.get("general.architecture", ""), args.n_layer, args.n_embd, args.n_ff, shapes)


def _sparse_layout(t: "_TensorLoader", i: int, n_embd: int, n_ff: int) -> dict:
    """Layer i's sparse-layout matrices where the file holds them (a converted file; PowerInfer's holds
    ffn_down_t), with the dense ones they stand in for derived on first use."""
    names = {"ffn_gate_up": f"blk.{i}.ffn_gate_up.weight", "ffn_down_t": f"blk.{i}.ffn_down_t.weight"}
    parts = {}
    if names["ffn_gate_up"] in t.gguf.tensors:
        gate_up = parts["ffn_gate_up"] = t.matrix(names["ffn_gate_up"], n_embd, 2 * n_ff)
        for name, first in (("ffn_gate", 0), ("ffn_up", 1)):
            parts[name] = _Derived(gate_up.qtype, n_embd, n_ff,
                                   lambda first=first: np.ascontiguousarray(gate_up.data[first::2]))
    if names["ffn_down_t"] in t.gguf.tensors:
        # dense ffn_down from its neuron-major copy, in F16: its values as they are (re-quantising them
        # would round them a second time)
        down_t = parts["ffn_down_t"] = t.matrix(names["ffn_down_t"], n_embd, n_ff)
        parts["ffn_down"] = _Derived(GGMLQuantizationType.F16, n_ff, n_embd,
                                     lambda: _blocks(_values(down_t).T, GGMLQuantizationType.F16))
    return parts


def load_weights(gguf: GGUFFile, args: ModelArgs) -> Weights:
    """All weights of a llama model, quantised ones left in their mapped blocks."""
    t = _TensorLoader(gguf)
    e, q, kv, ff = args.n_embd, args.n_head * args.head_dim, args.n_head_kv * args.head_dim, args.n_ff
    shapes = {"attn_q": (e, q), "attn_k": (e, kv), "attn_v": (e, kv), "attn_output": (q, e),
              "ffn_gate": (e, ff), "ffn_up": (e, ff), "ffn_down": (ff, e)}
    blocks = []
    for i in range(args.n_layer):
        if args.ffn_act.kind == "drelu" and not {f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_gate_up.weight"} & gguf.tensors.keys():
            raise HybridInferError(f"dReLU (relu(gate) * relu(up)) needs an up projection, and '{gguf.path}' lacks "
                                   f"blk.{i}.ffn_up.weight: give another --ffn-act")
        sparse = _sparse_layout(t, i, e, ff)
        parts = {f.name: (t.vector(f"blk.{i}.{f.name}.weight", e) if f.name.endswith("norm")
                          else t.matrix(f"blk.{i}.{f.name}.weight", *shapes[f.name]))
                 for f in fields(Block) if f.name not in sparse and (f.name in shapes or f.name.endswith("norm"))}
        blocks.append(Block(**parts, **sparse))
    token_embd = t.matrix("token_embd.weight", e, args.n_vocab)
    # The one fix-up llama files need: no output.weight means the output shares the embedding.
    output = t.matrix("output.weight", e, args.n_vocab) if "output.weight" in gguf.tensors else token_embd
    for qtype, (count, added) in t.dequantized.items():
        print(f"notice: {count} tensors of type {qtype} are dequantized to F32 at load "
              f"(+{added / 2**20:.0f} MiB of memory)", file=sys.stderr)
    return Weights(token_embd, blocks, t.vector("output_norm.weight", e), output)


# Types gguf can write, so a neuron-major copy keeps the file's type; others become Q8_0.
REQUANTIZABLE = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                           GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1})


def _values(m: Matrix) -> np.ndarray:
    """m's values, f32 [n_out, n_in], dequantised by the kernels."""
    out = np.empty((m.n_out, m.n_in), np.float32)
    kernels.get_rows(m.qtype, m.data, np.arange(m.n_out), out)
    return out


def _blocks(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """values f32 [n, k] (any strides) as uint8 rows of qtype blocks, byte for byte as gguf writes them."""
    if qtype in quant.TYPES:
        return quant.quantize(values, qtype)
    return quantize(np.ascontiguousarray(values), qtype).view(np.uint8).reshape(values.shape[0], -1)


def interleaved_type(gate: Matrix, up: Matrix) -> GGMLQuantizationType:
    """The type of interleaved_rows' copy: gate's where up has it too (rows move as they are) or gguf
    can write it (up re-quantised into it), else Q8_0."""
    return gate.qtype if gate.qtype == up.qtype or gate.qtype in REQUANTIZABLE else GGMLQuantizationType.Q8_0


# 4-bit types re-quantised along the other axis lose too much: one Q4_1 -> Q4_1 pass moves SmolLM2's
# ffn_down by 8.8% (relative norm) and its perplexity by +4.8%; into Q8_0 by 0.6%, the perplexity by -0.15%
_NEURON_MAJOR = {GGMLQuantizationType.Q4_0: GGMLQuantizationType.Q8_0,
                 GGMLQuantizationType.Q4_1: GGMLQuantizationType.Q8_0}


def neuron_major_type(down: Matrix, wanted: GGMLQuantizationType | None = None) -> GGMLQuantizationType:
    """The type of neuron_major's copy: wanted (one of REQUANTIZABLE) if given, else down's if gguf can
    write it and re-quantising it costs little (Q8_0 for the others); F16 where the new rows (n_ff
    values) are not whole blocks of that type."""
    if wanted is None:
        wanted = _NEURON_MAJOR.get(down.qtype, down.qtype) if down.qtype in REQUANTIZABLE else GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16 if down.n_out % GGML_QUANT_SIZES[wanted][0] else wanted


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of n values in qtype blocks."""
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def interleaved_rows(gate: Matrix, up: Matrix) -> Matrix:
    """gate and up as one matrix [2 * n_ff, n_embd], neuron i's gate row at 2i and its up row at 2i + 1,
    so that an active neuron's two rows are one contiguous read in decode's gather. Up is
    re-quantised into the copy's type (interleaved_type) where the two differ."""
    qtype = interleaved_type(gate, up)
    parts = [m.data if m.qtype == qtype else _blocks(_values(m), qtype) for m in (gate, up)]
    return Matrix(qtype, np.stack(parts, axis=1).reshape(2 * gate.n_out, -1), gate.n_in, 2 * gate.n_out)


def neuron_major(down: Matrix, wanted: GGMLQuantizationType | None = None) -> Matrix:
    """ffn_down [n_embd, n_ff] rearranged as [n_ff, n_embd], each neuron's down column one contiguous
    row of blocks, for the sparse axpy. Float types move exactly; quantised types are re-quantised
    along the new rows (neuron_major_type(down, wanted)): a second rounding, whose effect on
    perplexity the README reports."""
    qtype = neuron_major_type(down, wanted)
    return Matrix(qtype, _blocks(_values(down).T, qtype), down.n_out, down.n_in)

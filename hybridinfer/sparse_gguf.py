"""The sparse GGUF: one file holding what predicted decoding reads, in the layout it reads it.

`hybridinfer convert` writes the source's metadata and tensors, except that each layer's ffn_gate,
ffn_up and ffn_down give way to

    blk.N.ffn_gate_up.weight  [2 * n_ff, n_embd]  neuron i's gate row at 2i, its up row at 2i + 1
    blk.N.ffn_down_t.weight   [n_ff, n_embd]      ffn_down neuron-major (PowerInfer's name and layout)

(loader.interleaved_rows and neuron_major, made once here instead of at every load), with a predictor
blk.N.fc1.weight [r, n_embd] and blk.N.fc2.weight [n_ff, r] (PowerInfer's names) in the type they
run in, and with a profile each layer's neurons stored hottest first: the same permutation on gate,
up, down and the predictor's output rows, so results are unchanged and each layer's hot block is its
first rows. The file then also holds blk.N.ffn_perm (I32 [n_ff], the source neuron at each place)
and blk.N.ffn_counts (I64 [n_ff], the profile in that order, with PROFILE_TOKENS). Keys:
SOURCE_FINGERPRINT (the source model's fingerprint, so that predictors and profiles made for it serve
this file), THRESHOLDS and INFO (the predictor's logit thresholds and its training record).

PowerInfer's sparse GGUF (magic PWRI) holds ffn_gate and ffn_up, blk.N.ffn_down_t and its predictor
as blk.N.fc1 / fc2 with one logit threshold, powerinfer.sparse_threshold (0 when absent): read alike.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import GGUFFile
from hybridinfer.loader import (SOURCE_FINGERPRINT, ModelArgs, interleaved_rows, load_weights, model_fingerprint,
                                neuron_major, neuron_major_type, interleaved_type, row_bytes)
from hybridinfer.predictors import PredictorSet, PredictorWeights
from hybridinfer.predictors.activity import ActivationStats, StatsError
from hybridinfer.predictors.mlp import PREDICTOR_QTYPES, operand

THRESHOLDS = "hybridinfer.predictor.thresholds"
INFO = "hybridinfer.predictor.info"
PROFILE_TOKENS = "hybridinfer.profile.tokens"
POWERINFER_THRESHOLD = "powerinfer.sparse_threshold"
PREDICTOR_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0,
                   GGMLQuantizationType.Q4_0)
_FFN = ("ffn_gate", "ffn_up", "ffn_down")


def _permutations(gguf: GGUFFile, args: ModelArgs) -> list[np.ndarray] | None:
    """Per layer, the source neuron at each place of a converted file stored hottest first (each
    checked to be a permutation of the layer's neurons), else None."""
    if "blk.0.ffn_perm" not in gguf.tensors:
        return None
    perms = [_int_tensor(gguf, f"blk.{i}.ffn_perm", np.int32, args.n_ff) for i in range(args.n_layer)]
    for i, p in enumerate(perms):
        if not np.array_equal(np.sort(p), np.arange(args.n_ff)):
            raise HybridInferError(f"'{gguf.path}': blk.{i}.ffn_perm is not a permutation of the layer's "
                                   f"{args.n_ff} neurons: the file is damaged; convert the model again")
    return perms


def permuted(stats: ActivationStats, gguf: GGUFFile, args: ModelArgs) -> ActivationStats:
    """Statistics made for the source model, in the converted file's order of neurons."""
    perms = _permutations(gguf, args)
    if perms is None:
        return stats
    return ActivationStats([c[p] for c, p in zip(stats.counts, perms)], stats.tokens, stats.fingerprint, stats.source)


def permuted_predictor(weights: PredictorWeights, gguf: GGUFFile, args: ModelArgs) -> PredictorWeights:
    """A predictor made for the source model, its output rows in the converted file's order."""
    perms = _permutations(gguf, args)
    if perms is None:
        return weights
    return PredictorWeights(weights.fc1, [w[p] for w, p in zip(weights.fc2, perms)], weights.thresholds,
                            weights.fingerprint, weights.info, weights.source)


def profile(gguf: GGUFFile, args: ModelArgs) -> ActivationStats | None:
    """The profile a converted file carries (in its order of neurons), if any."""
    if "blk.0.ffn_counts" not in gguf.tensors:
        return None
    counts = [_int_tensor(gguf, f"blk.{i}.ffn_counts", np.int64, args.n_ff) for i in range(args.n_layer)]
    tokens = gguf.metadata.get(PROFILE_TOKENS)
    stats = ActivationStats(counts, tokens if isinstance(tokens, int) and tokens > 0 else None,
                            model_fingerprint(gguf, args))
    try:
        stats.validate(f"'{gguf.path}'", args.n_layer, args.n_ff)
    except StatsError as e:  # read with the model, so an error of the model file's
        raise HybridInferError(str(e)) from None
    return stats


def has_predictor(gguf: GGUFFile) -> bool:
    return "blk.0.fc1.weight" in gguf.tensors


def predictor(gguf: GGUFFile, args: ModelArgs) -> PredictorSet:
    """The predictor the file holds, its tensors used in place (mapped, not copied)."""
    where = f"'{gguf.path}'"
    if THRESHOLDS in gguf.metadata:
        thresholds = gguf.metadata[THRESHOLDS]
        if not isinstance(thresholds, np.ndarray) or thresholds.shape != (args.n_layer,) or \
                not np.isfinite(thresholds.astype(np.float64)).all():
            raise HybridInferError(f"{where}: metadata {THRESHOLDS} is not {args.n_layer} finite numbers: the file "
                                   f"is damaged; convert the model again")
        thresholds = [float(t) for t in thresholds]
    else:
        t = gguf.metadata.get(POWERINFER_THRESHOLD, 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t):
            raise HybridInferError(f"{where}: metadata {POWERINFER_THRESHOLD} is {t!r}, expected a finite number")
        thresholds = [float(t)] * args.n_layer
    fc1, fc2 = [], []
    for i in range(args.n_layer):
        for name, dest, n_in in (("fc1", fc1, args.n_embd), ("fc2", fc2, None)):
            t = gguf.tensors.get(f"blk.{i}.{name}.weight")
            if t is None:
                raise HybridInferError(f"{where} lacks blk.{i}.{name}.weight: its predictor is incomplete")
            if t.qtype not in PREDICTOR_TYPES or len(t.shape) != 2:
                raise HybridInferError(f"{where}: blk.{i}.{name}.weight is a {t.qtype.name} tensor of shape "
                                       f"{list(t.shape)}, expected 2-D {'/'.join(q.name for q in PREDICTOR_TYPES)}")
            dest.append((t.qtype, t.data, t.shape))
    for i, ((_, _, s1), (_, _, s2)) in enumerate(zip(fc1, fc2)):
        if s1[0] != args.n_embd or s2 != (s1[1], args.n_ff) or not 1 <= s1[1] <= args.n_ff:
            raise HybridInferError(f"{where}: layer {i}'s predictor has fc1 {list(s1)} and fc2 {list(s2)} (GGUF "
                                   f"order), expected [{args.n_embd}, r] and [r, {args.n_ff}]: the file is damaged")
    return PredictorSet.from_operands([w[:2] for w in fc1], [w[:2] for w in fc2], thresholds, args.n_embd)


def _int_tensor(gguf: GGUFFile, name: str, dtype, n: int) -> np.ndarray:
    t = gguf.tensors.get(name)
    qtype = GGMLQuantizationType.I32 if dtype == np.int32 else GGMLQuantizationType.I64
    if t is None or t.qtype != qtype or t.shape != (n,):
        raise HybridInferError(f"'{gguf.path}': {name} is missing or not {qtype.name} [{n}]: the file is damaged; "
                               f"convert the model again")
    return t.data.view(dtype).reshape(n)


@dataclass
class Summary:
    path: Path
    nbytes: int
    layers: int
    down: str  # the neuron-major ffn_down's type(s)
    predictor: str | None  # its type, when one was written
    permuted: bool


def convert(src: Path, out: Path, weights: PredictorWeights | None, predictor_type: str,
            stats: ActivationStats | None, progress, down_type: GGMLQuantizationType | None = None) -> Summary:
    """Write src's sparse GGUF to out (through a temporary file beside it, renamed at the end, so that no
    partial file is left behind); weights and stats have been checked against the model. progress wraps
    the per-layer loop (a progress bar); down_type: the neuron-major ffn_down's type (one of
    REQUANTIZABLE; default: neuron_major_type's choice)."""
    gguf = GGUFFile(src)
    if "blk.0.ffn_gate_up.weight" in gguf.tensors or "blk.0.ffn_down_t.weight" in gguf.tensors:
        raise HybridInferError(f"'{src}' is already a sparse GGUF: convert the model it came from")
    args = ModelArgs.from_metadata(gguf.metadata)
    blocks = load_weights(gguf, args).blk
    fp = model_fingerprint(gguf, args)
    order = [np.argsort(-c, kind="stable").astype(np.int32) for c in stats.counts] if stats else None
    down_types = [neuron_major_type(blk.ffn_down, down_type) for blk in blocks]
    predictors = None
    if weights is not None:
        q = PREDICTOR_QTYPES[predictor_type]
        predictors = [(operand(w1, q), operand(w2, q)) for w1, w2 in zip(weights.fc1, weights.fc2)]
    tmp = out.with_name(f".{out.name}.partial")
    writer = GGUFWriter(str(tmp), str(gguf.metadata["general.architecture"]))
    try:
        copy_metadata(src, writer)
        writer.add_string(SOURCE_FINGERPRINT, json.dumps(fp.as_dict()))
        if weights is not None:
            writer.add_array(THRESHOLDS, [float(t) for t in weights.thresholds])
            writer.add_string(INFO, json.dumps(weights.info))
        if stats is not None and stats.tokens:
            writer.add_uint64(PROFILE_TOKENS, stats.tokens)
        kept = [name for name in gguf.tensors if not (name.startswith("blk.") and name.split(".")[2] in _FFN)]
        for name in kept:
            t = gguf.tensors[name]
            byte_shape = (*reversed(t.shape[1:]), t.data.shape[1])  # NumPy order, rows of bytes
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), t.data.nbytes, raw_dtype=t.qtype)
        for i, (blk, dt) in enumerate(zip(blocks, down_types)):
            gu_type = interleaved_type(blk.ffn_gate, blk.ffn_up)
            gu_row, down_row = row_bytes(gu_type, args.n_embd), row_bytes(dt, args.n_embd)
            writer.add_tensor_info(f"blk.{i}.ffn_gate_up.weight", (2 * args.n_ff, gu_row), np.dtype(np.uint8),
                                   2 * args.n_ff * gu_row, raw_dtype=gu_type)
            writer.add_tensor_info(f"blk.{i}.ffn_down_t.weight", (args.n_ff, down_row), np.dtype(np.uint8),
                                   args.n_ff * down_row, raw_dtype=dt)
            if predictors:
                for name, (qtype, w) in zip(("fc1", "fc2"), predictors[i]):
                    writer.add_tensor_info(f"blk.{i}.{name}.weight", w.shape, np.dtype(np.uint8), w.nbytes,
                                           raw_dtype=qtype)
            if order:
                writer.add_tensor_info(f"blk.{i}.ffn_perm", (args.n_ff,), np.dtype(np.int32), 4 * args.n_ff)
                writer.add_tensor_info(f"blk.{i}.ffn_counts", (args.n_ff,), np.dtype(np.int64), 8 * args.n_ff)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in kept:
            writer.write_tensor_data(gguf.tensors[name].data)
        for i in progress(range(args.n_layer)):
            blk, perm = blocks[i], order[i] if order else None
            gate_up = interleaved_rows(blk.ffn_gate, blk.ffn_up).data
            down_t = neuron_major(blk.ffn_down, down_types[i]).data
            if perm is not None:
                gate_up = gate_up.reshape(args.n_ff, -1)[perm].reshape(2 * args.n_ff, -1)
                down_t = down_t[perm]
            writer.write_tensor_data(np.ascontiguousarray(gate_up))
            writer.write_tensor_data(np.ascontiguousarray(down_t))
            if predictors:
                (_, fc1), (_, fc2) = predictors[i]
                writer.write_tensor_data(fc1)
                writer.write_tensor_data(np.ascontiguousarray(fc2[perm] if perm is not None else fc2))
            if perm is not None:
                writer.write_tensor_data(perm)
                writer.write_tensor_data(np.ascontiguousarray(stats.counts[i][perm], np.int64))
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise HybridInferError(f"cannot write '{out}': {e.strerror or e}") from None
        raise
    down = "/".join(sorted({t.name for t in down_types}))
    return Summary(out, out.stat().st_size, args.n_layer, down, None if weights is None else predictor_type,
                   order is not None)


def copy_metadata(src: Path, writer: GGUFWriter) -> None:
    """Every key of src but the ones the writer sets itself, with its GGUF type."""
    for field in GGUFReader(str(src)).fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), vtype, sub)

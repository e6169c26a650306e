"""Run the engine over text and record, per layer, the FFN input and the true active set, on disk
(collect, for training predictors), or count how often each neuron is active (profile).

Per layer L the work directory holds resid_L.npy (f16 [N, n_embd], the residual stream before
ffn_norm, the predictor's input) and mask_L.npy (uint8 [N, ceil(n_ff / 8)], np.packbits of the
truly active set), written through np.lib.format.open_memmap so a large budget never sits in memory,
and collection.json (the chunks: which file, where, how many tokens).
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hybridinfer.errors import HybridInferError
from hybridinfer.ffn import ActiveSet
from hybridinfer.loader import ModelArgs
from hybridinfer.model import Transformer
from hybridinfer.predictors.activity import ActivationStats
from hybridinfer.predictors.format import Fingerprint
from hybridinfer.predictors.thresholds import Thresholds
from hybridinfer.tokenizer import Tokenizer

INDEX = "collection.json"


def progress_bar(iterable=None, **kw) -> tqdm:
    """tqdm, updating rarely when stderr is a log file rather than a terminal."""
    return tqdm(iterable, mininterval=0.2 if sys.stderr.isatty() else 30.0, **kw)


class RecordingFFN:
    """Wraps the model's FFN: computes the gate (and up) into its own buffers, hands (layer, resid,
    active mask) to ``sink``, then lets the wrapped FFN compute the output unchanged."""

    def __init__(self, inner, args: ModelArgs, n_batch: int, active: ActiveSet):
        self.inner, self.active = inner, active.check()  # a SiLU model without thresholds: refused early
        self.gate = np.zeros((n_batch, args.n_ff), np.float32)
        self.up = np.zeros((n_batch, args.n_ff), np.float32)
        self.mask = np.zeros((n_batch, args.n_ff), bool)
        self.sink = lambda layer, resid, mask: None

    def __call__(self, layer, blk, resid, xn, out) -> None:
        T = len(xn)
        mask = self.mask[:T]
        self.active.of(layer, blk, xn, self.gate[:T], self.up[:T], mask)
        self.sink(layer, resid, mask)
        self.inner(layer, blk, resid, xn, out)


@dataclass
class Chunk:
    source: int  # index into Collection.sources
    offset: int  # token offset in that file's token stream
    start: int  # first row in the recorded arrays
    length: int  # tokens, BOS included


@dataclass
class Collection:
    """Recorded activations in work_dir; arrays are opened read-only on demand."""

    work_dir: Path
    n_layer: int
    n_embd: int
    n_ff: int
    n_tokens: int
    sources: list[str]
    chunks: list[Chunk]

    def resid(self, layer: int) -> np.ndarray:
        """f16 [n_tokens, n_embd], memory-mapped."""
        return np.load(self.work_dir / f"resid_{layer}.npy", mmap_mode="r")

    def mask(self, layer: int) -> np.ndarray:
        """uint8 [n_tokens, ceil(n_ff / 8)] packed bits, memory-mapped; unpack with unpack_mask."""
        return np.load(self.work_dir / f"mask_{layer}.npy", mmap_mode="r")

    def unpack_mask(self, packed: np.ndarray) -> np.ndarray:
        return np.unpackbits(packed, axis=-1, count=self.n_ff).view(bool)

    def rows(self, chunk_ids) -> np.ndarray:
        """Row indices of the given chunks, in order."""
        return np.concatenate([np.arange(self.chunks[c].start, self.chunks[c].start + self.chunks[c].length)
                               for c in chunk_ids]) if len(chunk_ids) else np.zeros(0, np.int64)

    def save_index(self, request: dict | None = None) -> None:
        index = {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_ff": self.n_ff, "n_tokens": self.n_tokens,
                 "sources": self.sources, "chunks": [vars(c) for c in self.chunks], "request": request}
        (self.work_dir / INDEX).write_text(json.dumps(index) + "\n", encoding="utf-8")

    @classmethod
    def open(cls, work_dir: str | Path) -> "Collection":
        work_dir = Path(work_dir)
        index = json.loads((work_dir / INDEX).read_text(encoding="utf-8"))
        chunks = [Chunk(**c) for c in index.pop("chunks")]
        index.pop("request", None)
        return cls(work_dir, chunks=chunks, **index)


def plan_chunks(streams: list[list[int]], n_tokens: int, n_ctx: int, bos_id: int | None) -> list[tuple[int, int, int]]:
    """(source, offset, length) of the chunks to run: up to n_tokens split evenly over the files,
    each file's share taken as evenly spaced chunks across it, files interleaved. A chunk holds
    n_ctx tokens (fewer when n_tokens is smaller), its first being BOS where the model adds one."""
    bos = int(bos_id is not None)
    length = max(min(n_ctx, n_tokens), 2)
    body = length - bos  # text tokens per chunk
    available = [len(s) // body for s in streams]
    if not any(available):  # less text than one chunk: the longest text as one shorter chunk
        i = int(np.argmax([len(s) for s in streams]))
        return [(i, 0, len(streams[i]) + bos)] if len(streams[i]) + bos >= 2 else []
    shares, want = [0] * len(streams), max(n_tokens // length, 1)
    while sum(shares) < want and any(s < a for s, a in zip(shares, available)):  # round robin
        for i in range(len(streams)):
            if shares[i] < available[i] and sum(shares) < want:
                shares[i] += 1
    per_file = [[(i, int(p) * body, length) for p in np.linspace(0, avail - 1, share).round()]
                for i, (share, avail) in enumerate(zip(shares, available))]
    return [c for group in _interleave(per_file) for c in group]


def _interleave(lists):
    for k in range(max((len(x) for x in lists), default=0)):
        yield [x[k] for x in lists if k < len(x)]


def _request(model: Transformer, texts: list[Path], n_tokens: int, model_id: str, cett: Thresholds | None) -> dict:
    """What a collection depends on, to tell whether one in a work directory can be reused."""
    files = [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size, "mtime": Path(p).stat().st_mtime}
             for p in texts]
    cett_id = cett and hashlib.sha256(b"".join(cett.ffn(i).tobytes() for i in range(len(cett.layers)))).hexdigest()
    return {"model": model_id, "ffn_act": str(model.args.ffn_act), "cett": cett_id, "n_ctx": model.n_ctx,
            "n_tokens": n_tokens, "texts": files}


@dataclass
class Plan:
    """The chunks of text to run: token streams of the files and (source, offset, length) chunks."""

    streams: list[list[int]]
    chunks: list[Chunk]
    bos: int | None

    @property
    def n_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def tokens(self, c: Chunk) -> list[int]:
        """A chunk's tokens: BOS where the model adds one, then its text."""
        n_text = c.length - (self.bos is not None)
        return ([self.bos] if self.bos is not None else []) + self.streams[c.source][c.offset:c.offset + n_text]


def plan(tokenizer: Tokenizer, texts: list[Path], n_tokens: int, n_ctx: int) -> Plan:
    """Tokenize the texts and choose up to n_tokens tokens of chunks of n_ctx (see plan_chunks)."""
    streams = []
    for path in texts:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HybridInferError(f"cannot read text file '{path}': {getattr(e, 'strerror', None) or e}") from None
        streams.append(tokenizer.encode(text, add_special=False))
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    chunks, start = [], 0
    for source, offset, length in plan_chunks(streams, n_tokens, n_ctx, bos):
        chunks.append(Chunk(source, offset, start, length))
        start += length
    if not chunks:
        raise HybridInferError(f"the texts {', '.join(map(str, texts))} hold fewer than 2 tokens: give more text")
    return Plan(streams, chunks, bos)


def replay(model: Transformer, p: Plan, sink, progress: bool, desc: str, cett: Thresholds | None = None) -> None:
    """Run the model over the plan's chunks, handing each FFN layer's (layer, first row, resid, active
    mask) to sink: the rows are the chunks' rows in the recorded arrays (Chunk.start onwards). The
    active set is the activation's zeros, or that of CETT thresholds."""
    recorder = RecordingFFN(model.ffn, model.args, model.n_batch, ActiveSet(model.args.ffn_act, cett))
    inner, model.ffn = model.ffn, recorder
    try:
        with progress_bar(total=p.n_tokens, unit="tok", desc=desc, disable=not progress) as bar:
            for c in p.chunks:
                tokens = p.tokens(c)
                for i in range(0, len(tokens), model.n_batch):  # one forward step per sink call
                    recorder.sink = lambda layer, x, mask, row=c.start + i: sink(layer, row, x, mask)
                    model.forward(np.array(tokens[i:i + model.n_batch]), i)
                bar.update(c.length)
    finally:
        model.ffn = inner


def collect(model: Transformer, tokenizer: Tokenizer, texts: list[Path], n_tokens: int, work_dir: str | Path,
            progress: bool = True, model_id: str | None = None, cett: Thresholds | None = None) -> Collection:
    """Run model over up to n_tokens tokens of texts in chunks of model.n_ctx; record into work_dir.

    With model_id (naming the model file and its version), a complete collection already in
    work_dir made by the same request is reused instead of recomputed.
    """
    a = model.args
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    request = _request(model, texts, n_tokens, model_id, cett) if model_id else None
    if request and (work_dir / INDEX).is_file():
        index = json.loads((work_dir / INDEX).read_text(encoding="utf-8"))
        if index.get("request") == request:
            if progress:
                print(f"reusing the activations collected in {work_dir}", file=sys.stderr)
            return Collection.open(work_dir)
    (work_dir / INDEX).unlink(missing_ok=True)  # written last: marks a complete collection
    p = plan(tokenizer, texts, n_tokens, model.n_ctx)
    n = p.n_tokens
    col = Collection(work_dir, a.n_layer, a.n_embd, a.n_ff, n, [str(t) for t in texts], p.chunks)
    resid = [np.lib.format.open_memmap(work_dir / f"resid_{i}.npy", "w+", np.float16, (n, a.n_embd))
             for i in range(a.n_layer)]
    masks = [np.lib.format.open_memmap(work_dir / f"mask_{i}.npy", "w+", np.uint8, (n, -(-a.n_ff // 8)))
             for i in range(a.n_layer)]

    def sink(layer, row, x, mask):
        resid[layer][row:row + len(x)] = x
        masks[layer][row:row + len(x)] = np.packbits(mask, axis=1)

    replay(model, p, sink, progress, "collect", cett)
    for arr in resid + masks:
        arr.flush()
    del resid, masks
    col.save_index(request)
    return col


def profile(model: Transformer, tokenizer: Tokenizer, texts: list[Path], n_tokens: int, fingerprint: Fingerprint,
            progress: bool = True, cett: Thresholds | None = None) -> ActivationStats:
    """Count, per layer and neuron, the tokens among up to n_tokens tokens of texts (chunks of
    model.n_ctx, as collect takes them) for which the neuron was truly active."""
    p = plan(tokenizer, texts, n_tokens, model.n_ctx)
    counts = [np.zeros(model.args.n_ff, np.int64) for _ in range(model.args.n_layer)]

    def sink(layer, row, x, mask):
        counts[layer] += np.count_nonzero(mask, axis=0)

    replay(model, p, sink, progress, "profile", cett)
    return ActivationStats(counts, p.n_tokens, fingerprint)

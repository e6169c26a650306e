"""Memory-mapped GGUF reading: metadata as Python values, tensors as zero-copy NumPy views.

The header is parsed here rather than by ``gguf.GGUFReader``, which builds NumPy views for every
string of the vocabulary and takes about 5 s on a 49k-token vocabulary; this takes milliseconds.
Constants, quant block sizes and dequantization still come from the ``gguf`` package.
"""

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from hybridinfer.errors import HybridInferError

GGUF_MAGIC = b"GGUF"
POWERINFER_MAGIC = b"PWRI"  # PowerInfer's sparse GGUF: the same layout under its own magic
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

SCALAR_FORMATS = {  # GGUF scalar value type -> struct format (little-endian)
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def describe(value) -> str:
    """A short account of a metadata value for error messages."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {value.dtype} values"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {len(value)} values ({', '.join(kinds) or 'empty'})"
    text = repr(value)
    return f"the {type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def checked(meta: dict, key: str, check, expected: str, fix: str, default=None):
    """meta[key], or default when it is absent; a HybridInferError naming the key, the value, what was
    expected and fix when check(value) refuses it. Every metadata value the engine reads passes here."""
    if key not in meta:
        return default
    if not check(meta[key]):
        raise HybridInferError(f"GGUF metadata {key} is {describe(meta[key])}, expected {expected}: {fix}")
    return meta[key]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # GGML order: shape[0] is the row length (n_in)
    data: np.ndarray  # uint8 (n_rows, row_bytes) view of the mapped file


class _Cursor:
    """Reads little-endian GGUF values from a buffer; running past its end means a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise HybridInferError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value if len(value) > 1 else value[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise HybridInferError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, n = self.unpack("<IQ")
            if item_type in SCALAR_FORMATS and item_type != GGUFValueType.BOOL:
                dtype = np.dtype(SCALAR_FORMATS[item_type])
                if self.pos + n * dtype.itemsize > len(self.buf):
                    raise HybridInferError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
                arr = np.frombuffer(self.buf, dtype, n, self.pos).copy()
                self.pos += n * dtype.itemsize
                return arr
            return [self.value(item_type) for _ in range(n)]
        if vtype not in SCALAR_FORMATS:
            raise HybridInferError(f"{self.path}: unknown GGUF value type {vtype}: the file is damaged")
        return self.unpack(SCALAR_FORMATS[vtype])


def _map_whole(fileno: int) -> mmap.mmap:
    """The file mapped read-only, every page mapped now where the OS can (Linux MAP_POPULATE, as
    llama.cpp maps models) rather than faulted in on first use: sparse decoding reads rows in
    random order, and first-touch faults made its first tokens' gathers several times slower."""
    if hasattr(mmap, "MAP_POPULATE"):
        return mmap.mmap(fileno, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    return mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> value) and ``tensors`` (name -> TensorInfo); ``powerinfer``
    says whether it came under PowerInfer's magic."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise HybridInferError(f"model file '{self.path}' not found")
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic not in (GGUF_MAGIC, POWERINFER_MAGIC):
                raise HybridInferError(f"'{self.path}' is not a GGUF file (its first bytes are not 'GGUF', nor "
                                       f"PowerInfer's 'PWRI')")
            self.powerinfer = magic == POWERINFER_MAGIC
            self._map = _map_whole(f.fileno())
        cur = _Cursor(self._map, self.path)
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("<IQQ")
        if version not in (2, 3):
            raise HybridInferError(f"'{self.path}': GGUF version {version} is not supported (2 or 3)")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in self.metadata:
                raise HybridInferError(f"'{self.path}': metadata key '{key}' appears twice: the file is damaged")
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise HybridInferError(f"'{self.path}': tensor {name} has {n_dims} dimensions, expected 1 to "
                                       f"{MAX_DIMS}: the file is damaged")
            shape = cur.unpack(f"<{n_dims}Q")
            shape = shape if n_dims > 1 else (shape,)
            qtype, offset = cur.unpack("<IQ")
            if name in infos:
                raise HybridInferError(f"'{self.path}': tensor {name} appears twice: the file is damaged")
            infos[name] = (qtype, shape, offset)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
            raise HybridInferError(f"'{self.path}': general.alignment is {alignment!r}, expected a power of two: "
                                   f"the file is damaged")
        data_start = -(-cur.pos // alignment) * alignment
        buf = np.frombuffer(self._map, np.uint8)
        self.tensors = {name: self._tensor(buf, data_start, alignment, name, *info) for name, info in infos.items()}

    def _tensor(self, buf: np.ndarray, data_start: int, alignment: int, name: str, qtype: int,
                shape: tuple[int, ...], offset: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(qtype)
            block_size, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise HybridInferError(f"'{self.path}': tensor {name} has unknown type {qtype}") from None
        if min(shape) < 1 or shape[0] % block_size:
            raise HybridInferError(f"'{self.path}': tensor {name} has shape {list(shape)}, expected sizes of at "
                                   f"least 1 and rows of whole {qtype.name} blocks of {block_size}")
        if offset % alignment:
            raise HybridInferError(f"'{self.path}': tensor {name} starts at offset {offset}, not a multiple of the "
                                   f"alignment {alignment}: the file is damaged")
        row_bytes = shape[0] // block_size * type_size
        n_rows = math.prod(shape[1:])  # Python integers: damaged sizes cannot wrap around
        start = data_start + offset
        if start + n_rows * row_bytes > len(buf):
            raise HybridInferError(f"'{self.path}' is truncated: tensor {name} ends at byte "
                                   f"{start + n_rows * row_bytes}, the file has {len(buf)}")
        data = buf[start:start + n_rows * row_bytes].reshape(n_rows, row_bytes)
        return TensorInfo(name, qtype, shape, data)

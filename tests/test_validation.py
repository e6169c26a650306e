"""Damaged GGUF metadata and structure: one error line naming the key or tensor, before anything is sized
from it (the cases a fuzzer found as tracebacks or as values silently accepted)."""

import pytest
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

from fuzz import Base, gguf_bytes  # tools/ is on sys.path, see conftest.py
from hybridinfer import cli
from hybridinfer.commands.common import DEFAULT_MODEL


@pytest.fixture(scope="module")
def base() -> Base:
    return Base.read(DEFAULT_MODEL)


def run_on(tmp_path, capsys, content: bytes, *args: str) -> str:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    status = cli.main(["run", str(path), "-n", "1", "-t", "1", "--sparse", "off", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("key, vtype, value, words", [
    ("llama.attention.head_count", V.UINT32, 0, "head_count"),
    ("llama.block_count", V.STRING, "6", "block_count"),
    ("llama.block_count", V.INT32, -1, "block_count"),
    ("llama.block_count", V.UINT32, 0, "block_count"),
    ("llama.rope.freq_base", V.STRING, "1e4", "freq_base"),
    ("llama.rope.freq_base", V.FLOAT32, float("nan"), "freq_base"),
    ("llama.rope.freq_base", V.FLOAT32, float("inf"), "freq_base"),
    ("llama.rope.freq_base", V.FLOAT32, 0.0, "freq_base"),
    ("llama.rope.dimension_count", V.UINT32, 64, "dimension_count"),  # more than head_dim 32
    ("llama.rope.dimension_count", V.UINT32, 2**31, "dimension_count"),
    ("llama.rope.dimension_count", V.UINT32, 0, "dimension_count"),
    ("llama.rope.dimension_count", V.UINT32, 1, "dimension_count"),
    ("llama.rope.dimension_count", V.UINT32, 15, "dimension_count"),
    ("llama.context_length", V.INT32, -1, "context_length"),
    ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, float("nan"), "epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, -1e-5, "epsilon"),
    ("llama.attention.head_count_kv", V.UINT32, 3, "KV heads"),  # 8 heads
    ("hybridinfer.ffn_activation", V.UINT32, 1, "ffn_activation"),
    ("hybridinfer.ffn_activation", V.STRING, "gelu", "gelu"),
    ("general.alignment", V.UINT32, 0, "alignment"),
    ("general.alignment", V.UINT32, 48, "alignment"),
    ("general.architecture", V.UINT32, 7, "architecture"),
])
def test_bad_metadata_value(tmp_path, capsys, base, key, vtype, value, words):
    kvs = [list(kv) for kv in base.kvs if kv[0] != key] + [[key, vtype, None, value]]
    assert words in run_on(tmp_path, capsys, gguf_bytes(kvs, base.infos, base.data))


def test_fatrelu_threshold_from_metadata(tmp_path, capsys, base):
    kvs = [list(kv) for kv in base.kvs if kv[0] != "hybridinfer.ffn_activation"]
    kvs += [["hybridinfer.ffn_activation", V.STRING, None, "fatrelu"],
            ["hybridinfer.ffn_act_threshold", V.FLOAT32, None, float("inf")]]
    assert "ffn_act_threshold" in run_on(tmp_path, capsys, gguf_bytes(kvs, base.infos, base.data))


def test_duplicate_key(tmp_path, capsys, base):
    kvs = base.kvs + [base.kvs[5]]
    assert "appears twice" in run_on(tmp_path, capsys, gguf_bytes(kvs, base.infos, base.data))


@pytest.mark.parametrize("n_dims, dim, qtype, words", [
    (0, None, None, "0 dimensions"),
    (5, None, None, "5 dimensions"),
    (None, 0, None, "shape"),
    (None, 2**63, None, "truncated"),  # a size this large must not wrap around
    (None, None, 99, "unknown type 99"),
])
def test_bad_tensor_info(tmp_path, capsys, base, n_dims, dim, qtype, words):
    infos = [[name, list(dims), t, offset] for name, dims, t, offset in base.infos]
    target = infos[1]
    if dim is not None:
        target[1][-1] = dim
    if qtype is not None:
        target[2] = qtype
    content = gguf_bytes(base.kvs, infos, base.data, {target[0]: n_dims} if n_dims is not None else None)
    assert words in run_on(tmp_path, capsys, content)


def test_norm_of_an_integer_type(tmp_path, capsys, base):
    infos = [[name, dims, Q.I32 if name == "blk.0.attn_norm.weight" else t, offset]
             for name, dims, t, offset in base.infos]
    assert "blk.0.attn_norm.weight" in run_on(tmp_path, capsys, gguf_bytes(base.kvs, infos, base.data))


def test_misaligned_tensor(tmp_path, capsys, base):
    infos = [[name, dims, t, offset + (4 if i == 3 else 0)] for i, (name, dims, t, offset) in enumerate(base.infos)]
    assert "alignment" in run_on(tmp_path, capsys, gguf_bytes(base.kvs, infos, base.data))


def test_context_beyond_memory(capsys):
    assert cli.main(["bench", "-p", "1000000000", "-n", "1", "-r", "1"]) == 1
    err = capsys.readouterr().err
    assert "GiB" in err and "lower -p/-n" in err and err.count("\n") == 1

"""The header parser against gguf's own GGUFReader, the oracle, on every key and tensor."""

import numpy as np
import pytest
from gguf import GGUFReader

from hybridinfer.gguf_file import GGUFFile


@pytest.mark.parametrize("name", ["tiny_q8", "tiny_f16", "smollm2"])
def test_agrees_with_gguf_reader(request, name):
    path = request.getfixturevalue(name)
    ours, oracle = GGUFFile(path), GGUFReader(path)
    assert set(ours.metadata) == {k for k in oracle.fields if not k.startswith("GGUF.")}
    for key, field in oracle.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours.metadata[key]
        assert (list(got) == expected) if isinstance(expected, list) else got == expected, key
    assert [t.name for t in oracle.tensors] == list(ours.tensors)
    for t in oracle.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.shape == tuple(int(d) for d in t.shape)
        assert not mine.data.flags.owndata  # a view of the mapped file, not a copy
        assert np.array_equal(mine.data.reshape(-1), t.data.view(np.uint8).reshape(-1)), t.name

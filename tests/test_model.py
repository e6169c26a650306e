"""The forward pass against an independent NumPy llama, on the tiny ReLU model and random models."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from hybridinfer.kernels import AttentionDecoder
from hybridinfer.loader import FFNActivation
from hybridinfer.model import N_BATCH, RunState, load_model
from hybridinfer.perplexity import perplexity
import llama_reference
from hybridinfer import loader
from hybridinfer.kernels.ops import ROUND_NONE
from llama_reference import ReferenceLlama
from make_gguf import write_llama_gguf

TINY_TEXT = "And it came to pass, when the king of Israel heard these words, that he rent his clothes"


INTEGER_DOT = (Q.Q8_0, Q.Q4_0, Q.Q4_1)  # their kernels always quantise the input to 8 bits


@pytest.fixture(autouse=True, params=["f32 inputs", "llama.cpp rounding"])
def rounding(request, monkeypatch):
    """Each test twice: with mat-vec inputs in f32 on both sides, where engine and reference must agree
    to float rounding, and with llama.cpp's 8-bit / f16 input rounding on both sides, where the
    order of float sums decides some roundings and their flips spread to the 8-bit noise level.
    f32 inputs exist only for float weights (the tiny model's F16 file stands in for its Q8_0 one)."""
    if request.param == "f32 inputs":
        monkeypatch.setattr(loader, "DOT_ROUNDING", dict.fromkeys(loader.DOT_ROUNDING, ROUND_NONE))
        monkeypatch.setattr(llama_reference, "round_input", lambda x, qtype: x)
    return request.param


@pytest.fixture
def tiny_file(rounding, tiny_q8, tiny_f16):
    return tiny_f16 if rounding == "f32 inputs" else tiny_q8


def assert_close_logits(got: np.ndarray, expected: np.ndarray, rounding: str) -> None:
    err, scale = np.abs(got - expected), np.abs(expected)
    if rounding == "f32 inputs":
        assert err.max() < 1e-4 * scale.max(), err.max()
    else:
        assert err.max() < 5e-2 * scale.max(), err.max()
        assert err.mean() < 1e-2 * scale.mean(), err.mean()


@pytest.fixture
def tiny(tiny_file):
    return load_model(tiny_file, n_ctx=256)


def tiny_tokens(n: int = 60) -> np.ndarray:
    return np.random.default_rng(1).integers(3, 4096, n)


def test_tiny_logits_match_numpy_reference(tiny, tiny_file, rounding):
    _, model = tiny
    tokens = tiny_tokens()
    expected, _ = ReferenceLlama(tiny_file, "relu").forward(tokens)
    assert_close_logits(model.forward(tokens, 0, all_logits=True), expected, rounding)


def test_prefill_equals_token_by_token(tiny, rounding):
    _, model = tiny
    tokens = tiny_tokens(40)
    batched = model.forward(tokens, 0, all_logits=True).copy()
    stepped = np.stack([model.forward(tokens[i:i + 1], i)[0].copy() for i in range(len(tokens))])
    # matvec and matmul sum in different orders; an input or cache rounding can flip on that
    assert_close_logits(stepped, batched, rounding)


def test_attention_decoder_equals_the_composed_steps(tiny_file, rounding):
    """One token's attention block in one kernel call computes what the steps of the batch path compose:
    the same bits when each kernel is compiled once, and within float rounding when numba compiled a
    kernel twice (fastmath lets each compilation contract its sums its own way)."""
    tokens = tiny_tokens(12)
    results = []
    for fused in (True, False):
        _, model = load_model(tiny_file, n_ctx=16)
        model.forward(tokens[:11], 0)  # fill the cache
        x = model.s.x[:1]
        x[:] = np.random.default_rng(2).standard_normal(x.shape)
        for i, blk in enumerate(model.w.blk):
            if fused:
                model.attention_decoders[i](x, 11)
            else:
                model._attention(i, blk, 11, 1)
        results.append((x.copy(), model.s.k_cache[:, :, :12].copy(), model.s.v_cache[:, :, :12].copy()))
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-5, atol=1e-6)


def test_kv_cache_is_f16_and_counted_at_two_bytes(tiny_file):
    """The cache is stored as llama.cpp's, f16; RunState.nbytes (the memory check) is what is allocated."""
    _, model = load_model(tiny_file, n_ctx=32)
    assert model.s.k_cache.dtype == model.s.v_cache.dtype == np.float16
    assert RunState.nbytes(model.args, 32, N_BATCH) == sum(a.nbytes for a in vars(model.s).values())


def test_decoder_writes_inf_beyond_f16_range_and_takes_only_f16_caches():
    """k and v beyond f16's range become inf in the decode kernel's cache write, as in the prefill's
    NumPy cast; float32 caches are refused."""
    n_embd, n_head, hd, n_ctx = 32, 2, 16, 4
    values = np.tile([1e6, -100.5, -1e6, 3e-6], n_head * hd // 4)  # k and v of the token (x and norm all ones)
    w = np.repeat(values[:, None] / n_embd, n_embd, axis=1).astype(np.float32).view(np.uint8)
    weight, rope = (Q.F32, ROUND_NONE, w), np.zeros((n_ctx, 0), np.float32)
    caches = np.zeros((2, 1, n_ctx, n_head * hd), np.float16)  # one KV head of n_head * hd values
    weights = (weight, weight, weight, (Q.F32, ROUND_NONE, np.zeros((n_embd, n_head * hd), np.float32).view(np.uint8)))
    decoder = AttentionDecoder(np.ones(n_embd, np.float32), 1e-5, *weights, 1, rope, rope, *caches)
    decoder(np.ones((1, n_embd), np.float32), 2)
    for cache in caches:
        np.testing.assert_array_equal(np.isinf(cache[0, 2]), np.abs(values) > 65520)
        assert np.isfinite(cache[0, 2]).sum() == len(values) // 2 and not cache[0, [0, 1, 3]].any()
    with pytest.raises(ValueError, match="k_cache must be a float16 array"):
        AttentionDecoder(np.ones(n_embd, np.float32), 1e-5, *weights, 1, rope, rope, *caches.astype(np.float32))


def test_prefill_in_micro_batches_equals_one_batch(tiny_file, rounding):
    tokens = tiny_tokens(100)
    _, whole = load_model(tiny_file, n_ctx=128)
    _, split = load_model(tiny_file, n_ctx=128)
    split.n_batch = 32
    assert_close_logits(split.forward(tokens, 0, all_logits=True), whole.forward(tokens, 0, all_logits=True), rounding)


def test_silu_override_changes_activation(tiny_file, rounding):
    tokens = tiny_tokens(20)
    _, model = load_model(tiny_file, n_ctx=64, ffn_act=FFNActivation.parse("silu"))
    expected, _ = ReferenceLlama(tiny_file, "silu").forward(tokens)
    assert_close_logits(model.forward(tokens, 0, all_logits=True), expected, rounding)


def test_tiny_relu_perplexity_and_sparsity_match_its_readme(tiny_q8):
    """The model card: perplexity 43.5 on val.txt (chunks of 256, BOS, second half), sparsity 79.3%."""
    from hybridinfer.tokenizer import Tokenizer
    gguf, model = load_model(tiny_q8, n_ctx=256)
    tok = Tokenizer.from_metadata(gguf.metadata)
    text = (tiny_q8.parent / "val.txt").read_text()
    result = perplexity(model, tok.encode(text), tok.bos_id)
    assert result.ppl == pytest.approx(43.5, rel=0.01)
    _, acts = ReferenceLlama(tiny_q8, "relu").forward(np.array(tok.encode(text)[:256]))
    sparsity = np.mean([np.mean(a == 0) for a in acts])
    assert sparsity == pytest.approx(0.793, abs=0.03)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tied", [False, True])
def test_random_model_matches_reference(tmp_path, qtype, tied, rounding):
    if rounding == "f32 inputs" and qtype in INTEGER_DOT:
        pytest.skip("integer dot products always take 8-bit inputs")
    path = write_llama_gguf(tmp_path / "m.gguf", qtype=qtype, tied=tied, n_embd=64, n_ff=96)
    tokens = np.random.default_rng(0).integers(0, 275, 24)
    expected, _ = ReferenceLlama(path, "relu").forward(tokens)
    _, model = load_model(path)
    assert_close_logits(model.forward(tokens, 0, all_logits=True), expected, rounding)


def test_dequantized_at_load_type_works_with_notice(tmp_path, capsys, rounding):
    path = write_llama_gguf(tmp_path / "m.gguf", qtype=Q.MXFP4, n_embd=64, n_ff=96)  # gguf writes it, the kernels do not read it
    tokens = np.arange(10)
    expected, _ = ReferenceLlama(path, "relu").forward(tokens)
    _, model = load_model(path)
    assert "MXFP4 are dequantized to F32 at load" in capsys.readouterr().err
    assert_close_logits(model.forward(tokens, 0, all_logits=True), expected, rounding)

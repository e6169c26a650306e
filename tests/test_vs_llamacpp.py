"""The engine against llama.cpp's own outputs on the same GGUF files (tests/references/, written by
tools/llamacpp_reference.py with llama-cpp-python): greedy next tokens under teacher forcing and
perplexity. llama.cpp applies SiLU to every llama FFN, so the tiny ReLU model runs with silu here."""

import json
from collections import Counter

import numpy as np
import pytest
from conftest import REFERENCES, SHARED

from hybridinfer.loader import FFNActivation
from hybridinfer.model import load_model
from hybridinfer.perplexity import perplexity
from hybridinfer.tokenizer import Tokenizer

CASES = {"tiny-relu-llama-q8_0": "tiny_q8", "smollm2-135m-instruct-q4_1": "smollm2",
         "smollm2-135m-instruct-q4_k_m": "smollm2_q4_k_m"}


@pytest.fixture(scope="session")
def smollm2_q4_k_m(smollm2):
    """SmolLM2 requantised to Q4_K_M by llama.cpp's own quantiser (tools/requantize.py), made once next
    to the Q4_1 file: Q5_0, Q4_K, Q8_0 and Q6_K tensors, read in their blocks."""
    pytest.importorskip("llama_cpp", reason="llama.cpp's quantiser makes the Q4_K_M file (.ci/run installs it)")
    from requantize import requantize
    return requantize(smollm2, smollm2.with_name("SmolLM2-135M-Instruct.Q4_K_M.gguf"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    ref = json.loads((REFERENCES / f"{request.param}.json").read_text(encoding="utf-8"))
    path = request.getfixturevalue(CASES[request.param])
    assert path.stat().st_size == ref["file_size"], f"{path} is not the file the reference was written from"
    return ref, path


def teacher_forced(ref, logits_of) -> tuple[int, int]:
    """(agreeing, all) next tokens of llama.cpp's greedy continuations that logits_of (the logits of
    a sequence of token ids, one row per position) predicts when fed prompt + continuation at once."""
    agree = total = 0
    for g in ref["greedy"]:
        assert len(g["ids"]) >= 8
        seq = g["prompt_ids"] + g["ids"]
        predicted = np.asarray(logits_of(seq[:-1]))[len(g["prompt_ids"]) - 1:].argmax(axis=1)
        agree += int((predicted == np.array(g["ids"])).sum())
        total += len(g["ids"])
    return agree, total


def llamacpp_self_agreement(path, ref) -> float:
    """The share of llama.cpp's own greedy tokens (generated one at a time) that llama.cpp's batched
    evaluation of prompt + continuation predicts: how far its two paths' rounding lets a file's near
    ties flip."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)

    def logits_of(ids):
        llm.reset()
        llm.eval(ids)
        return llm.scores[:len(ids)]
    agree, total = teacher_forced(ref, logits_of)
    return agree / total


def test_greedy_next_token_agrees_under_teacher_forcing(case):
    """Fed llama.cpp's prompt + greedy continuation, our argmax equals its next token at >= 98%, or,
    where llama.cpp's own batched evaluation does not reach 98% (the Q4_K_M file: its continuations
    are full of near ties, a quarter to a half of their top-two margins under 0.35), as often as
    that evaluation does, measured in the same run, within 1% (3 of 308 tokens: each pair of the three
    evaluations, ours and llama.cpp's two, disagrees on 18-20 of them, whose count varies by about 4)."""
    ref, path = case
    bar = 0.98
    if ref["model"].endswith(".Q4_K_M.gguf"):
        bar = min(bar, llamacpp_self_agreement(path, ref) - 0.01)
    _, model = load_model(path, n_ctx=512, ffn_act=FFNActivation.parse(ref["ffn_act"]))
    agree, total = teacher_forced(ref, lambda ids: model.forward(np.array(ids), 0, all_logits=True))
    assert len(ref["greedy"]) >= 5 and total >= 5 * 32
    assert agree / total >= bar, f"{agree}/{total} next tokens agree, under {bar:.1%}"


def test_perplexity_within_half_percent(case):
    ref, path = case
    p = ref["perplexity"]
    gguf, model = load_model(path, n_ctx=p["n_ctx"], ffn_act=FFNActivation.parse(ref["ffn_act"]))
    tok = Tokenizer.from_metadata(gguf.metadata)
    text = (SHARED.parent / p["file"]).read_text(encoding="utf-8").removesuffix("\n")
    tokens = tok.encode(text)
    assert len(tokens) == p["n_tokens_text"]
    result = perplexity(model, tokens, tok.bos_id if tok.add_bos else None, p["n_chunks"])
    assert len(result.chunk_nll) == p["n_chunks"]
    assert result.ppl == pytest.approx(p["ppl"], rel=0.005)
    assert result.err == pytest.approx(p["ppl_err"], rel=0.05)


def test_k_quant_file_loads_without_dequantising(smollm2_q4_k_m, capsys):
    """Every matrix of the Q4_K_M file stays in its blocks: no dequantisation notice."""
    gguf, model = load_model(smollm2_q4_k_m, n_ctx=64)
    assert "notice" not in capsys.readouterr().err
    types = Counter(t.qtype.name for t in gguf.tensors.values())
    assert types == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert {b.ffn_down.qtype.name for b in model.w.blk} == {"Q4_K", "Q6_K"}

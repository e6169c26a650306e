"""The engine against llama.cpp's own outputs on the same GGUF files (tests/references/, written by
tools/llamacpp_reference.py with llama-cpp-python): greedy next tokens under teacher forcing and
perplexity. llama.cpp applies SiLU to every llama FFN, so the tiny ReLU model runs with silu here."""

import json

import numpy as np
import pytest
from conftest import REFERENCES, SHARED

from hybridinfer.loader import FFNActivation
from hybridinfer.model import load_model
from hybridinfer.perplexity import perplexity
from hybridinfer.tokenizer import Tokenizer

CASES = {"tiny-relu-llama-q8_0": "tiny_q8", "smollm2-135m-instruct-q4_1": "smollm2"}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    ref = json.loads((REFERENCES / f"{request.param}.json").read_text(encoding="utf-8"))
    path = request.getfixturevalue(CASES[request.param])
    assert path.stat().st_size == ref["file_size"], f"{path} is not the file the reference was written from"
    return ref, path


def test_greedy_next_token_agrees_under_teacher_forcing(case):
    """Fed llama.cpp's prompt + greedy continuation, our argmax equals its next token at >= 98%."""
    ref, path = case
    _, model = load_model(path, n_ctx=512, ffn_act=FFNActivation.parse(ref["ffn_act"]))
    agree = total = 0
    for g in ref["greedy"]:
        assert len(g["ids"]) >= 8
        seq = np.array(g["prompt_ids"] + g["ids"])
        logits = model.forward(seq[:-1], 0, all_logits=True)
        predicted = logits[len(g["prompt_ids"]) - 1:].argmax(axis=1)
        agree += int((predicted == seq[len(g["prompt_ids"]):]).sum())
        total += len(g["ids"])
    assert len(ref["greedy"]) >= 5 and total >= 5 * 32
    assert agree / total >= 0.98, f"{agree}/{total} next tokens agree"


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

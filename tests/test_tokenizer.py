"""The tokenizer against llama.cpp's ids, pieces and stop tokens (tests/references/, written by
tools/llamacpp_reference.py), for a SentencePiece vocabulary (tiny-relu-llama) and a byte-level BPE
one (SmolLM2)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCES, ROOT

from hybridinfer.gguf_file import GGUFFile
from hybridinfer.tokenizer import Tokenizer

CASES = {"tiny-relu-llama-q8_0": "tiny_q8", "smollm2-135m-instruct-q4_1": "smollm2"}


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> tuple[dict, dict]:
    """(reference, GGUF metadata) of one model."""
    ref = json.loads((REFERENCES / f"{request.param}.json").read_text(encoding="utf-8"))
    path: Path = request.getfixturevalue(CASES[request.param])
    if path.stat().st_size != ref["file_size"]:
        pytest.fail(f"{path} is not the file {REFERENCES / request.param}.json was written from")
    return ref, GGUFFile(path).metadata


@pytest.fixture(scope="module")
def tok(case) -> Tokenizer:
    return Tokenizer.from_metadata(case[1])


def test_special_ids_match_llamacpp(case, tok):
    vocab = case[0]["vocab"]
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (vocab["n_vocab"], vocab["bos"], vocab["eos"])
    assert (tok.add_bos, tok.add_eos) == (vocab["add_bos"], vocab["add_eos"])
    assert tok.stop_ids == frozenset(vocab["eog_ids"])


def test_encode_matches_llamacpp(case, tok):
    for entry in case[0]["tokenize"]:
        got = tok.encode(entry["text"], entry["add_special"], entry["parse_special"])
        assert got == entry["ids"], entry


def test_encode_greedy_prompts(case, tok):
    for entry in case[0]["greedy"]:
        assert tok.encode(entry["prompt"], True, entry["parse_special"]) == entry["prompt_ids"]


def test_encode_whole_perplexity_text(case, tok):
    ppl = case[0]["perplexity"]
    text = (ROOT.parent / ppl["file"]).read_text(encoding="utf-8")
    ids = tok.encode(text.removesuffix("\n"))
    assert (len(ids), ids[:16]) == (ppl["n_tokens_text"], ppl["first_ids"])
    assert hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest() == ppl["ids_sha256"]


def test_other_bpe_pretokenizers(case):
    ref, meta = case
    if "tokenize_other_pre" not in ref:
        pytest.skip("not a byte-level BPE vocabulary")
    for pre, entries in ref["tokenize_other_pre"].items():
        tok = Tokenizer.from_metadata({**meta, "tokenizer.ggml.pre": pre})
        for entry in entries:
            assert tok.encode(entry["text"]) == entry["ids"], (pre, entry)


def test_pieces_match_llamacpp(case, tok):
    for entry in case[0]["pieces"]:
        assert tok.piece(entry["id"]).hex() == entry["piece"], entry
        assert tok.piece(entry["id"], special=True).hex() == entry["special_piece"], entry


def test_streamed_pieces_give_llamacpp_text(case, tok):
    for entry in case[0]["greedy"]:
        streamed = b"".join(tok.piece(i) for i in entry["ids"]).decode("utf-8", errors="replace")
        assert streamed == entry["text"]


def test_decode_round_trips(case, tok):
    for entry in case[0]["tokenize"]:
        if not entry["parse_special"]:
            assert tok.decode(tok.encode(entry["text"], entry["add_special"])) == entry["text"]


def test_control_tokens_render_only_when_asked(tok):
    ids = tok.encode("<|im_start|>hi<|im_end|>" if "<|im_end|>" in tok.tokens else "hi", parse_special=True)
    if tok.add_bos:
        assert ids[0] == tok.bos_id and tok.piece(tok.bos_id) == b""
    assert tok.decode(ids) == "hi"
    assert tok.piece(tok.eos_id, special=True) == tok.tokens[tok.eos_id].encode()


def test_unsupported_tokenizer_model_is_rejected(case):
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        Tokenizer.from_metadata({**case[1], "tokenizer.ggml.model": "bert"})


def test_unsupported_pretokenizer_is_rejected(case):
    meta = {**case[1], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}
    meta.setdefault("tokenizer.ggml.merges", [])
    with pytest.raises(ValueError, match="'qwen2' is not supported"):
        Tokenizer.from_metadata(meta)

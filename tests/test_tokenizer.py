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
from hybridinfer.errors import HybridInferError
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


# Malformed tokenizer metadata, as a fuzzer found it: each ends in HybridInferError, not a traceback
# from SentencePiece, `tokenizers` or our own indexing.

def _edit(meta: dict, **keys) -> dict:
    """meta with tokenizer.ggml.<key> replaced (None removes it)."""
    out = dict(meta)
    for key, value in keys.items():
        out.pop(f"tokenizer.ggml.{key}", None)
        if value is not None:
            out[f"tokenizer.ggml.{key}"] = value
    return out


def _with_token(meta: dict, i: int, text: str, ty: int | None = None) -> dict:
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[i] = text
    types = meta["tokenizer.ggml.token_type"].copy()
    if ty is not None:
        types[i] = ty
    return _edit(meta, tokens=tokens, token_type=types)


def _malformed(meta: dict) -> dict[str, dict]:
    n = len(meta["tokenizer.ggml.tokens"])
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    cases = {
        "model missing": _edit(meta, model=None),
        "model numeric": _edit(meta, model=np.arange(3, dtype=np.int32)),
        "tokens missing": _edit(meta, tokens=None),
        "tokens numeric array": _edit(meta, tokens=np.arange(n, dtype=np.int32)),
        "tokens a string": _edit(meta, tokens="abc"),
        "tokens empty": _edit(meta, tokens=[]),
        "a token not a string": _edit(meta, tokens=[*tokens[:-1], 7]),
        "duplicate token": _with_token(meta, 5, tokens[6]),
        "duplicate token by its NUL": _with_token(meta, 5, tokens[6] + "\0x"),
        "token_type floats": _edit(meta, token_type=types.astype(np.float32)),
        "token_type a list": _edit(meta, token_type=types.tolist()),
        "token_type short": _edit(meta, token_type=types[:-1]),
        "token_type a string": _edit(meta, token_type="1"),
        "scores strings": _edit(meta, scores=["0.0"] * n),
        "scores short": _edit(meta, scores=np.zeros(n - 1, np.float32)),
        "scores a number": _edit(meta, scores=0.5),
        "bad byte piece": _with_token(meta, 7, "<0xZZ>", 6),
        "lowercase byte piece": _with_token(meta, 7, "<0x0a>", 6),
        "pre numeric": _edit(meta, pre=np.zeros(2, np.int32)),
        "bos id a string": _edit(meta, bos_token_id="1"),
        "eos id a float": _edit(meta, eos_token_id=2.0),
        "eos id a bool": _edit(meta, eos_token_id=True),
        "eot id an array": _edit(meta, eot_token_id=np.zeros(2, np.int32)),
        "add_bos_token a string": _edit(meta, add_bos_token="true"),
        "add_bos_token an array": _edit(meta, add_bos_token=np.ones(2, np.uint8)),
        "add_eos_token without eos": _edit(meta, add_bos_token=False, add_eos_token=True, eos_token_id=n,
                                           model=meta["tokenizer.ggml.model"], tokens=tokens[:1],
                                           token_type=types[:1], scores=None, merges=[]),
    }
    if meta["tokenizer.ggml.model"] == "llama":
        byte_ids = np.flatnonzero(types == 6)
        cases["255 byte pieces"] = _with_token(meta, int(byte_ids[0]), "<00>", 1)
        normal = int(np.flatnonzero(types == 1)[0])
        cases["a piece sentencepiece refuses (too long)"] = _with_token(meta, normal, "x" * 10000)
    else:
        merges = meta["tokenizer.ggml.merges"]
        cases["gpt2 without merges"] = _edit(meta, merges=None)
        cases["merges numeric"] = _edit(meta, merges=np.zeros(3, np.int32))
        cases["merges a string"] = _edit(meta, merges="a b")
        cases["a merge not a string"] = _edit(meta, merges=[*merges, 5])
        cases["a merge of tokens it lacks"] = _edit(meta, merges=[*merges, "\u4e01 \u4e02"])
        cases["a merge whose result it lacks"] = _edit(meta, merges=[*merges, f"{tokens[300]} {tokens[301]}"])
        cases["a token tokenizers refuses (lone surrogate)"] = _with_token(meta, 9, "\ud800x")
    return cases


def test_malformed_tokenizer_metadata_is_refused(case):
    for name, meta in _malformed(case[1]).items():
        try:
            Tokenizer.from_metadata(meta)
        except HybridInferError as e:
            assert str(e) and "\n" not in str(e), name
        except Exception as e:
            pytest.fail(f"{name}: {type(e).__name__}: {e}")
        else:
            pytest.fail(f"{name}: accepted")


def test_vocabulary_must_match_the_models_logits(case):
    meta = case[1]
    n = len(meta["tokenizer.ggml.tokens"])
    assert Tokenizer.from_metadata(meta, n_vocab=n).n_vocab == n
    for n_vocab in (n - 1, n + 1):
        with pytest.raises(HybridInferError, match=f"has {n} tokens .* gives {n_vocab} logits"):
            Tokenizer.from_metadata(meta, n_vocab=n_vocab)


def test_odd_metadata_llamacpp_accepts_is_accepted(case, tok):
    """What llama.cpp's vocabulary loader accepts, the same way: a NUL ends a token, an empty token
    is named [EMPTY_i], unknown types are undefined (render as nothing), extra per-token values are
    ignored, merges without a space never apply, more than one unknown token is allowed."""
    text, meta = case[0]["tokenize"][0]["text"], case[1]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    longer = _edit(meta, token_type=np.append(types, [99, 1]).astype(types.dtype),
                   scores=None if "tokenizer.ggml.scores" not in meta else np.append(meta["tokenizer.ggml.scores"], 1))
    if "tokenizer.ggml.merges" in meta:
        longer["tokenizer.ggml.merges"] = [*meta["tokenizer.ggml.merges"], "nospace", " "]
    same = [longer, _with_token(meta, 5, tokens[5] + "\0junk")]
    for m in same:
        other = Tokenizer.from_metadata(m)
        assert other.encode(text) == tok.encode(text) and other.tokens == tok.tokens

    spare = int(np.flatnonzero(types == 3)[-1])  # a control token: neither text nor merges use it
    odd = Tokenizer.from_metadata(_with_token(meta, spare, "", 3))
    assert odd.tokens[spare] == f"[EMPTY_{spare}]" and odd.piece(spare, special=True) == f"[EMPTY_{spare}]".encode()
    assert odd.encode(f"a[EMPTY_{spare}]", parse_special=True)[-1] == spare
    assert Tokenizer.from_metadata(_with_token(meta, spare, "\0abc")).tokens[spare] == f"[EMPTY_{spare}]"
    assert Tokenizer.from_metadata(_with_token(meta, spare, "<odd>", 42)).piece(spare, special=True) == b""
    two_unk = Tokenizer.from_metadata(_with_token(meta, spare, "<unk2>", 2))
    assert two_unk.encode(text) == tok.encode(text)
    assert two_unk.encode("<unk2>", add_special=False, parse_special=True) == [spare]


def test_special_ids_outside_the_vocabulary_fall_back_as_in_llamacpp(case, capsys):
    meta = case[1]
    n = len(meta["tokenizer.ggml.tokens"])
    spm_vocab = meta["tokenizer.ggml.model"] == "llama"
    tok = Tokenizer.from_metadata(_edit(meta, bos_token_id=n, eos_token_id=-1, eot_token_id=n + 5))
    assert (tok.bos_id, tok.eos_id) == ((1, 2) if spm_vocab else (11, 11))
    assert n + 5 not in tok.stop_ids and "eos_token_id -1 is outside the vocabulary" in capsys.readouterr().err

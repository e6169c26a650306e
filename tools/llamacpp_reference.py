"""Write llama.cpp's outputs for a GGUF model to one JSON file, as the reference our engine is tested against.

    python tools/llamacpp_reference.py MODEL.gguf -o tests/references/NAME.json [--ffn-act silu]
        [-f TEXT_FILE] [-c N_CTX] [--chunks N] [--n-predict N]

Needs llama-cpp-python (`pip install llama-cpp-python`). The file holds:
- "tokenize": llama_tokenize ids for varied prompts, each with three (add_special, parse_special) pairs;
- "pieces": token_to_piece bytes (hex) for a sample of tokens, with and without `special`;
- "greedy": argmax continuations, stopping at llama.cpp's end-of-generation tokens;
- "perplexity": llama-perplexity's method (tools/perplexity/perplexity.cpp), redone in Python
  over llama.cpp's logits: the file minus one trailing newline, tokenized with add_special; chunks
  of n_ctx tokens, the first token of each replaced by BOS when the vocabulary adds BOS; each chunk
  from an empty KV cache; positions n_ctx/2 .. n_ctx-2 scored against the next token.
- for byte-level BPE vocabularies, ids under other `tokenizer.ggml.pre` values (vocab-only copies).
llama.cpp applies SiLU in every llama FFN, so the outputs are those of `--ffn-act silu`.
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

TOKENIZE_PROMPTS = [
    "", " ", "\n", "Hello world", "hello world!", " leading space", "   three leading spaces",
    "trailing spaces   ", "tabs\tand\t\ttabs", "line one\nline two\n\n\nline five", "a\r\nb",
    "Numbers: 7 42 365 2024 1234567890 3.14159 -0.5 1,000,000",
    "Héllo naïve café résumé Ærøskøbing", "Привет, мир! Ωμέγα", "日本語のテキストです。中文字符和标点。",
    "한국어 텍스트", "Emoji: 😀👍🏽🇫🇷❤️", "e\u0301 combining accent, \u00a0no-break\u2009thin space",
    "def add(a, b):\n    return a + b  # sum\n", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "<html><body class=\"x\">&amp;</body></html>", "don't I'm we'll they've she'd IT'S",
    "And it came to pass, when the king of Israel heard these words, that he rent his clothes.",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>text after",
    "<s>Hello</s> <unk>", "x<|im_end|>y</s>z", "\x00\x01 control chars \x7f",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters and ½ ⅓ numerals Ⅻ",
]
FLAG_PAIRS = [(True, False), (False, False), (True, True)]  # (add_special, parse_special)

GREEDY_PROMPTS = [
    "And it came to pass, when the king",
    "In the beginning God created",
    "ROMEO:\nO, speak again, bright angel",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n",
]
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
OTHER_BPE_PRE = ["gpt-2", "default", "llama-bpe"]


def token_piece(vocab, token: int, special: bool) -> bytes:
    buf = (llama_cpp.ctypes.c_char * 256)()
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return bytes(buf[:n])


def greedy(llm: llama_cpp.Llama, prompt_ids: list[int], n_predict: int, eog: set[int]) -> dict:
    llm.reset()  # the next eval drops the whole KV cache
    llm.eval(prompt_ids)
    first = llm.scores[llm.n_tokens - 1]
    top = np.argsort(-first)[:10]
    out = []
    while len(out) < n_predict:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in eog:
            break
        llm.eval([token])
    return {"prompt_ids": prompt_ids, "ids": out, "stopped_at_eog": out[-1] in eog,
            "text": llm.detokenize(out).decode("utf-8", errors="replace"),
            "first_top10": [[int(t), round(float(first[t]), 4)] for t in top]}


def ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest()


def perplexity(llm: llama_cpp.Llama, text: str, n_ctx: int, n_chunks: int, bos: int, add_bos: bool) -> dict:
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    if len(tokens) < 2 * n_ctx:
        raise SystemExit(f"the text tokenizes to {len(tokens)} tokens; perplexity needs at least {2 * n_ctx}")
    n_chunks = min(n_chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    nll_all = []
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        if add_bos:
            chunk = [bos] + chunk[1:]  # replaces the first token, as llama-perplexity does
        llm.reset()
        llm.eval(chunk)
        logits = llm.scores[first:n_ctx - 1].astype(np.float64)  # predicts chunk[first + 1:]
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        targets = np.array(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll_all.append(log_z - logits[np.arange(len(targets)), targets])
        print(f"  chunk {i + 1}/{n_chunks}: running PPL {np.exp(np.concatenate(nll_all).mean()):.4f}")
    nll = np.concatenate(nll_all)
    mean, count = nll.mean(), len(nll)
    ppl = float(np.exp(mean))
    var = (nll ** 2).mean() - mean ** 2
    return {"n_ctx": n_ctx, "n_chunks": n_chunks, "add_bos": add_bos, "n_tokens_text": len(tokens),
            "first_ids": tokens[:16], "ids_sha256": ids_sha256(tokens),
            "predictions_per_chunk": n_ctx - 1 - first, "count": count,
            "chunk_mean_nll": [round(float(c.mean()), 6) for c in nll_all],
            "mean_nll": round(float(mean), 6), "ppl": round(ppl, 4),
            "ppl_err": round(float(ppl * np.sqrt(var / (count - 1))), 5)}


def other_pre_ids(model: Path, prompts: list[str]) -> dict:
    """Ids llama.cpp gives under other pre-tokenizers, from vocab-only copies of the file's metadata."""
    reader = gguf.GGUFReader(model)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in OTHER_BPE_PRE:
            path = Path(tmp) / f"vocab-{pre}.gguf"
            writer = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents())
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key == "general.architecture":
                    continue
                value = pre if key == "tokenizer.ggml.pre" else field.contents()
                writer.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.close()
            vocab_llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            result[pre] = [{"text": p, "ids": vocab_llm.tokenize(p.encode(), add_bos=True, special=False)}
                           for p in prompts]
    return result


def to_json(value, indent: str = "") -> str:
    """JSON with one line per list item or leaf value, so that reviews and diffs stay readable."""
    inner = indent + " "
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) for v in value.values()):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner).lstrip()}" for k, v in value.items()]
        return indent + "{\n" + ",\n".join(items) + "\n" + indent + "}" + ("\n" if not indent else "")
    if isinstance(value, list) and value and isinstance(value[0], dict):
        rows = ",\n".join(inner + json.dumps(v, ensure_ascii=False) for v in value)
        return f"{indent}[\n{rows}\n{indent}]"
    return indent + json.dumps(value, ensure_ascii=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--ffn-act", choices=["silu"], default="silu",
                        help="the FFN activation llama.cpp applies (always SiLU for llama), recorded in the file")
    parser.add_argument("-f", "--file", type=Path, default=DEFAULT_TEXT, help="text for the perplexity")
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--n-predict", type=int, default=48)
    args = parser.parse_args()
    for name in ("ctx_size", "chunks", "n_predict"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")

    llm = llama_cpp.Llama(str(args.model), n_ctx=args.ctx_size, n_batch=args.ctx_size, n_ubatch=args.ctx_size,
                          logits_all=True, n_threads=2, n_threads_batch=2, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = {t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    bos, add_bos = llama_cpp.llama_vocab_bos(vocab), bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    meta = gguf.GGUFReader(args.model).fields
    with open(args.model, "rb") as fh:
        head = fh.read(1 << 20)

    ref = {
        "model": args.model.name, "file_size": args.model.stat().st_size,
        "sha256_first_mib": hashlib.sha256(head).hexdigest(), "llama_cpp_python": llama_cpp.__version__,
        "ffn_act": args.ffn_act,
        "model_ffn_activation": meta["hybridinfer.ffn_activation"].contents()
        if "hybridinfer.ffn_activation" in meta else None,
        "vocab": {"n_vocab": n_vocab, "bos": bos, "eos": llama_cpp.llama_vocab_eos(vocab), "add_bos": add_bos,
                  "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)), "eog_ids": sorted(eog)},
    }
    ref["tokenize"] = [{"text": p, "add_special": a, "parse_special": s,
                        "ids": llm.tokenize(p.encode(), add_bos=a, special=s)}
                       for p in TOKENIZE_PROMPTS for a, s in FLAG_PAIRS]
    sample = sorted(set(range(40)) | set(random.Random(0).sample(range(n_vocab), 60)) | eog)
    ref["pieces"] = [{"id": t, "piece": token_piece(vocab, t, False).hex(),
                      "special_piece": token_piece(vocab, t, True).hex()} for t in sample]

    prompts = [(p, False) for p in GREEDY_PROMPTS]
    chatml = b"<|im_start|>"
    if llm.tokenize(chatml, add_bos=False, special=True) != llm.tokenize(chatml, add_bos=False):
        prompts.append((CHAT_PROMPT, True))  # the vocabulary has the ChatML control tokens
    ref["greedy"] = []
    for prompt, parse_special in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=parse_special)
        ref["greedy"].append({"prompt": prompt, "parse_special": parse_special, "n_predict": args.n_predict,
                              **greedy(llm, ids, args.n_predict, eog)})
        print(f"greedy {prompt!r} -> {ref['greedy'][-1]['text']!r}")

    text = args.file.read_text(encoding="utf-8")
    text = text[:-1] if text.endswith("\n") else text  # llama.cpp's -f drops one trailing newline
    print(f"perplexity on {args.file} (-c {args.ctx_size}, --chunks {args.chunks})")
    where = os.path.relpath(args.file.resolve(), ROOT.parent)  # e.g. shared/data/..., beside the repo
    ref["perplexity"] = {"file": where, **perplexity(llm, text, args.ctx_size, args.chunks, bos, add_bos)}
    print(f"PPL = {ref['perplexity']['ppl']:.4f} +/- {ref['perplexity']['ppl_err']:.5f}")

    if meta["tokenizer.ggml.model"].contents() == "gpt2":
        ref["tokenize_other_pre"] = other_pre_ids(args.model, TOKENIZE_PROMPTS)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_json(ref))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

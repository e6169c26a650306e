"""Tokenizers built from GGUF metadata alone, giving the ids llama.cpp's `llama_tokenize` gives.

Two vocabularies are supported, as llama.cpp names them in `tokenizer.ggml.model`:

- `llama`: SentencePiece BPE (scores, byte fallback `<0xNN>` pieces). A SentencePiece model is
  built in memory from the GGUF pieces with an identity normalizer; llama.cpp's own rules sit
  around it: a space before text that starts the prompt or follows a special token
  (`add_space_prefix`), no other normalization, BOS from `add_bos_token`.
- `gpt2`: byte-level BPE with merges, run by the `tokenizers` library with the pre-tokenizer
  regexes llama.cpp's llama-vocab.cpp uses for the `tokenizer.ggml.pre` value.

Special tokens are split out of the text first, as llama.cpp's `tokenizer_st_partition` does:
user-defined tokens always, control and unknown tokens only with `parse_special`.
"""

from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from hybridinfer.errors import HybridInferError

# GGUF token types (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied one after the other, ignore_merges, default add_bos),
# copied from llama.cpp's llm_tokenizer_bpe and llama_vocab::impl::load
BPE_PRE = {
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"], False, False),
    "gpt-2": ([GPT2_SPLIT], False, False),
    "smollm": ([r"\p{N}", GPT2_SPLIT], False, False),
    "llama3": ([LLAMA3_SPLIT], True, True),
    "llama-v3": ([LLAMA3_SPLIT], True, True),
    "llama-bpe": ([LLAMA3_SPLIT], True, True),
}

# Token texts llama.cpp treats as end of generation whatever their type (llama-vocab.cpp): the
# end-of-turn family, and the FIM pad / repo / file-separator tokens it auto-detects
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
])
EOG_KEYS = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")


class UnsupportedTokenizer(HybridInferError, ValueError):
    """The GGUF file's tokenizer is one this engine cannot reproduce."""


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


BYTE_DECODER = _gpt2_byte_decoder()


class Tokenizer:
    """Encodes and decodes like llama.cpp for the vocabulary in a GGUF file's metadata.

    `meta` maps GGUF keys to values as `gguf.ReaderField.contents()` gives them. `stop_ids` are the
    tokens llama.cpp ends generation on (its `llama_vocab_is_eog`), not only EOS.
    """

    def __init__(self, meta: dict):
        self.model = meta.get("tokenizer.ggml.model")
        if self.model not in ("llama", "gpt2"):
            raise UnsupportedTokenizer(f"GGUF tokenizer model '{self.model}' is not supported "
                                       "(supported: llama, gpt2)")
        self.tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        self.n_vocab = len(self.tokens)
        self.types: list[int] = list(meta.get("tokenizer.ggml.token_type", [NORMAL] * self.n_vocab))
        spm_vocab = self.model == "llama"
        if spm_vocab:
            self._sp = self._sentencepiece(meta)
            default_bos = True
        else:
            self._hf, default_bos = self._byte_level_bpe(meta)
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id", 1 if spm_vocab else None)
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id", 2 if spm_vocab else None)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = spm_vocab and bool(meta.get("tokenizer.ggml.add_space_prefix", True))

        # llama.cpp marks end-of-generation-looking tokens as control tokens, then stops on them
        stops = {i for i, t in enumerate(self.tokens) if t in EOG_TEXTS}
        for i in stops:
            self.types[i] = CONTROL
        stops |= {meta.get(f"tokenizer.ggml.{key}_token_id") for key in EOG_KEYS} | {self.eos_id}
        self.stop_ids = frozenset(stops - {None})

        # longest first, as llama.cpp's special-token cache is sorted
        self._specials = sorted((i for i, ty in enumerate(self.types)
                                 if ty in (CONTROL, USER_DEFINED, UNKNOWN)),
                                key=lambda i: -len(self.tokens[i]))
        self._pieces = [self._raw_piece(i) for i in range(self.n_vocab)]

    @classmethod
    def from_metadata(cls, meta: dict) -> Tokenizer:
        return cls(meta)

    def _sentencepiece(self, meta: dict) -> spm.SentencePieceProcessor:
        proto = sp_pb2.ModelProto()
        proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
        proto.trainer_spec.byte_fallback = BYTE in self.types
        proto.trainer_spec.unk_id = self.types.index(UNKNOWN) if UNKNOWN in self.types else 0
        # llama.cpp normalizes nothing: the space prefix is added by encode, spaces become U+2581
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        scores = meta.get("tokenizer.ggml.scores", [0.0] * self.n_vocab)
        for text, score, ty in zip(self.tokens, scores, self.types):
            proto.pieces.add(piece=text, score=score, type=ty)
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _byte_level_bpe(self, meta: dict) -> tuple[HFTokenizer, bool]:
        pre = meta.get("tokenizer.ggml.pre", "default")  # llama.cpp's fallback when the key is missing
        if pre not in BPE_PRE:
            raise UnsupportedTokenizer(f"GGUF tokenizer.ggml.pre '{pre}' is not supported "
                                       f"(supported: {', '.join(BPE_PRE)})")
        regexes, ignore_merges, add_bos = BPE_PRE[pre]
        merges = []
        for m in meta["tokenizer.ggml.merges"]:
            cut = m.index(" ", 1)  # the first space after the first character, as llama.cpp splits
            merges.append((m[:cut], m[cut + 1:]))
        vocab = {t: i for i, t in enumerate(self.tokens)}
        hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf, add_bos

    def _raw_piece(self, i: int) -> bytes:
        """llama.cpp's token_to_piece(special=True) for token i."""
        text, ty = self.tokens[i], self.types[i]
        if ty in (CONTROL, USER_DEFINED, UNKNOWN):
            return text.encode()
        if ty == BYTE:
            return bytes([int(text[3:5], 16)])
        if ty != NORMAL:
            return b""
        if self.model == "llama":
            return text.replace("\u2581", " ").encode()
        return b"".join(bytes([BYTE_DECODER[c]]) if c in BYTE_DECODER else c.encode() for c in text)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Text split around special tokens: str for raw text, int for a special token id."""
        parts: list[str | int] = [text] if text else []
        for sid in self._specials:
            if not parse_special and self.types[sid] != USER_DEFINED:
                continue
            needle, out = self.tokens[sid], []
            for part in parts:
                if isinstance(part, int) or needle not in part:
                    out.append(part)
                    continue
                for k, piece in enumerate(part.split(needle)):
                    out += ([sid] if k else []) + ([piece] if piece else [])
            parts = out
        return parts

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        ids = [self.bos_id] if add_special and self.add_bos else []
        prev_special = True  # llama.cpp puts the space prefix before the first text too
        for part in self._partition(text, parse_special):
            if isinstance(part, int):
                ids.append(part)
                prev_special = True
            elif self.model == "llama":
                prefix = " " if self.add_space_prefix and prev_special else ""
                ids += self._sp.encode(prefix + part)
                prev_special = False
            else:
                ids += self._hf.encode(part, add_special_tokens=False).ids
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def piece(self, id: int, special: bool = False) -> bytes:
        """The bytes token `id` adds to the output; control tokens add nothing unless `special`."""
        if not special and self.types[id] in (CONTROL, UNKNOWN):
            return b""
        return self._pieces[id]

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of `ids`, without the space that `add_space_prefix` put before the text.

        Unlike llama.cpp's detokenize, that space goes even after a BOS, so decode(encode(x)) == x.
        """
        out = b"".join(self.piece(i, special) for i in ids)
        if self.add_space_prefix and out.startswith(b" "):
            out = out[1:]
        return out.decode("utf-8", errors="replace")


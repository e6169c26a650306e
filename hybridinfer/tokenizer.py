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

Every tokenizer.* key is checked first, in one place (`Vocab.from_metadata`): types, lengths,
ranges, and their relations (merges name tokens, the vocabulary matches the model's logits), so
that a damaged file ends in one HybridInferError, not in an error deep inside a library.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import checked

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
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # as SentencePiece and llama.cpp's byte_to_token spell them
DAMAGED = "the file's tokenizer metadata is damaged: re-convert the model"


def _key(meta: dict, key: str, check, expected: str, default=None):
    """meta["tokenizer.ggml." + key], default when absent (gguf_file.checked)."""
    return checked(meta, f"tokenizer.ggml.{key}", check, expected, DAMAGED, default)


def _unique_tokens(tokens: list[str]) -> tuple[list[str], dict[str, int]]:
    """The tokens as llama.cpp reads them, and their ids; a token given twice is refused, as there."""
    # llama.cpp reads each token as a C string, so a NUL byte ends it, and names empty tokens
    # [EMPTY_i] (SentencePiece refuses both, and an empty special token would split every text)
    if any(not t or "\0" in t for t in tokens):
        tokens = [t.partition("\0")[0] or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) < len(tokens):
        i = next(i for i, t in enumerate(tokens) if ids[t] != i)  # ids keeps the last of each
        raise HybridInferError(f"GGUF vocabulary has the token {tokens[i][:40]!r} twice (ids {i} and "
                               f"{ids[tokens[i]]}): {DAMAGED}")
    return tokens, ids


def _merges(listed: list[str], ids: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges "a b" as pairs, each of a, b and ab a token (`tokenizers` refuses others)."""
    # split at the first space after the first character, as llama.cpp does; it keeps a merge
    # without one as a pair of empty strings, which never applies, so it is left out here
    pairs = [(m[:cut], m[cut + 1:]) for m in listed if (cut := m.find(" ", 1)) > 0]
    if {t for a, b in pairs for t in (a, b, a + b)} <= ids.keys():
        return pairs
    a, b = next((a, b) for a, b in pairs if not {a, b, a + b} <= ids.keys())
    missing = next(t for t in (a, b, a + b) if t not in ids)
    raise HybridInferError(f"GGUF tokenizer.ggml.merges has the merge {a[:40]!r} {b[:40]!r}, which needs the "
                           f"token {missing[:40]!r}, not in the vocabulary: {DAMAGED}")


@dataclass
class Vocab:
    """The tokenizer.* metadata, checked: every type, length and range, and the relations between them.

    Where llama.cpp's llama_vocab::impl::load accepts odd data, so does this, in the same way.
    """

    model: str  # "llama" or "gpt2"
    tokens: list[str]
    ids: dict[str, int]  # token -> id
    types: list[int]  # 0 (undefined) .. BYTE
    scores: list[float]
    merges: list[tuple[str, str]]  # gpt2 only
    pre: str  # gpt2 only
    bos_id: int | None
    eos_id: int | None
    eog_ids: list[int]  # eos, eot, eom, fim pad/repo/separator: the ids the file gives that end generation
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    @classmethod
    def from_metadata(cls, meta: dict, n_vocab: int | None = None) -> Vocab:
        """The vocabulary of `meta`; n_vocab, when given, is how many logits the model gives."""
        model = _key(meta, "model", lambda v: isinstance(v, str), "a string")
        if model is None:
            raise HybridInferError("the GGUF file has no tokenizer (no tokenizer.ggml.model): hybridinfer needs "
                                   "the vocabulary in the file")
        if model not in ("llama", "gpt2"):
            raise UnsupportedTokenizer(f"GGUF tokenizer model {model[:40]!r} is not supported (supported: llama, gpt2)")
        spm_vocab = model == "llama"

        tokens = _key(meta, "tokens", lambda v: isinstance(v, list) and v and all(isinstance(t, str) for t in v),
                      "a non-empty array of strings")
        if tokens is None:
            raise HybridInferError(f"GGUF metadata lacks tokenizer.ggml.tokens: {DAMAGED}")
        n = len(tokens)
        if n_vocab is not None and n != n_vocab:
            raise HybridInferError(f"the vocabulary has {n} tokens (tokenizer.ggml.tokens) but the model gives "
                                   f"{n_vocab} logits (llama.vocab_size, token_embd.weight): {DAMAGED}")
        tokens, ids = _unique_tokens(tokens)

        def per_token(key: str, kinds: str, expected: str) -> list | None:
            """A numeric array with a value per token; llama.cpp ignores any values past the last token."""
            value = _key(meta, key, lambda v: isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in kinds
                         and v.size >= n, f"{expected} with a value for each of the {n} tokens")
            return None if value is None else value[:n].tolist()

        # llama.cpp takes a type it does not know for "undefined" (0), which renders as nothing
        types = per_token("token_type", "iu", "an integer array")
        types = [NORMAL] * n if types is None else [t if 0 <= t <= BYTE else 0 for t in types]
        scores = per_token("scores", "iuf", "a numeric array") or [0.0] * n
        byte_ids = [i for i, ty in enumerate(types) if ty == BYTE]
        for i in byte_ids:
            if not BYTE_PIECE.fullmatch(tokens[i]):
                raise HybridInferError(f"GGUF token {i} {tokens[i][:40]!r} has type BYTE but is not a byte piece "
                                       f"<0x00>..<0xFF>: {DAMAGED}")
        if spm_vocab and len(byte_ids) not in (0, 256):
            raise HybridInferError(f"GGUF vocabulary has {len(byte_ids)} byte tokens <0xNN>; a SentencePiece "
                                   f"vocabulary has none or all 256: {DAMAGED}")

        pre = _key(meta, "pre", lambda v: isinstance(v, str), "a string", "default")  # llama.cpp's fallback
        merges = []
        if not spm_vocab:
            if pre not in BPE_PRE:
                raise UnsupportedTokenizer(f"GGUF tokenizer.ggml.pre {pre[:40]!r} is not supported "
                                           f"(supported: {', '.join(BPE_PRE)})")
            listed = _key(meta, "merges", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
                          "an array of strings")
            if listed is None:
                raise HybridInferError(f"GGUF tokenizer model gpt2 needs tokenizer.ggml.merges, which the file "
                                       f"lacks: {DAMAGED}")
            merges = _merges(listed, ids)

        def token_id(key: str, default: int | None) -> int | None:
            """A special token's id; one outside the vocabulary falls back to the default, as in llama.cpp."""
            value = _key(meta, f"{key}_token_id", lambda v: isinstance(v, int) and not isinstance(v, bool),
                         "an integer token id")
            default = default if default is not None and default < n else None
            if value is None or 0 <= value < n:
                return default if value is None else value
            instead = "ignoring it" if default is None else f"using {default} instead"
            print(f"notice: GGUF tokenizer.ggml.{key}_token_id {value} is outside the vocabulary of {n} tokens: "
                  f"{instead}, as llama.cpp does", file=sys.stderr)
            return default

        def flag(key: str, default: bool) -> bool:
            return bool(_key(meta, key, lambda v: isinstance(v, (bool, np.bool_)), "a boolean", default))

        # llama.cpp's defaults: 1 and 2 for SentencePiece vocabularies, 11 for BPE ones
        bos_id = token_id("bos", 1 if spm_vocab else 11)
        eos_id = token_id("eos", 2 if spm_vocab else 11)
        eog_ids = [i for i in (eos_id, *(token_id(key, None) for key in EOG_KEYS[1:])) if i is not None]
        add_bos = flag("add_bos_token", spm_vocab or BPE_PRE[pre][2])
        add_eos = flag("add_eos_token", False)
        add_space_prefix = spm_vocab and flag("add_space_prefix", True)
        for added, key, id in ((add_bos, "bos", bos_id), (add_eos, "eos", eos_id)):
            if added and id is None:
                raise HybridInferError(f"GGUF tokenizer.ggml.add_{key}_token is true but the vocabulary has no "
                                       f"{key} token: {DAMAGED}")
        return cls(model, tokens, ids, types, scores, merges, pre, bos_id, eos_id, eog_ids, add_bos, add_eos,
                   add_space_prefix)


class Tokenizer:
    """Encodes and decodes like llama.cpp for the vocabulary in a GGUF file's metadata.

    `meta` maps GGUF keys to values as `GGUFFile.metadata` gives them; `n_vocab`, when given, is the
    number of logits the model gives, which the vocabulary must match. `stop_ids` are the tokens
    llama.cpp ends generation on (its `llama_vocab_is_eog`), not only EOS.
    """

    def __init__(self, meta: dict, n_vocab: int | None = None):
        vocab = Vocab.from_metadata(meta, n_vocab)
        self.model = vocab.model
        self.tokens = vocab.tokens
        self.n_vocab = len(self.tokens)
        self.types = vocab.types
        self._sp = self._sentencepiece(vocab) if self.model == "llama" else None
        self._hf = self._byte_level_bpe(vocab) if self.model == "gpt2" else None
        self.bos_id, self.eos_id = vocab.bos_id, vocab.eos_id
        self.add_bos, self.add_eos, self.add_space_prefix = vocab.add_bos, vocab.add_eos, vocab.add_space_prefix

        # llama.cpp marks end-of-generation-looking tokens as control tokens, then stops on them
        stops = {i for i, t in enumerate(self.tokens) if t in EOG_TEXTS}
        for i in stops:
            self.types[i] = CONTROL
        self.stop_ids = frozenset(stops.union(vocab.eog_ids))

        # longest first, as llama.cpp's special-token cache is sorted
        self._specials = sorted((i for i, ty in enumerate(self.types)
                                 if ty in (CONTROL, USER_DEFINED, UNKNOWN)),
                                key=lambda i: -len(self.tokens[i]))
        self._pieces = [self._raw_piece(i) for i in range(self.n_vocab)]

    @classmethod
    def from_metadata(cls, meta: dict, n_vocab: int | None = None) -> Tokenizer:
        return cls(meta, n_vocab)

    @staticmethod
    def _sentencepiece(vocab: Vocab) -> spm.SentencePieceProcessor:
        proto = sp_pb2.ModelProto()
        proto.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
        proto.trainer_spec.byte_fallback = BYTE in vocab.types
        # SentencePiece wants exactly one unknown piece: the first, else token 0 (llama.cpp's default
        # unk id); other unknown tokens become control pieces, which it never produces from text either
        unk_id = vocab.types.index(UNKNOWN) if UNKNOWN in vocab.types else 0
        proto.trainer_spec.unk_id = unk_id
        # llama.cpp normalizes nothing: the space prefix is added by encode, spaces become U+2581
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        # Vocab's checks cover what SentencePiece refuses that we know of (empty, NUL, duplicate and
        # byte pieces, unknown types); this names the vocabulary if it refuses something else
        try:
            for i, (text, score, ty) in enumerate(zip(vocab.tokens, vocab.scores, vocab.types)):
                ty = UNKNOWN if i == unk_id else CONTROL if ty == UNKNOWN else ty or UNUSED
                proto.pieces.add(piece=text, score=score, type=ty)
            return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (RuntimeError, ValueError) as e:
            raise HybridInferError(f"the GGUF file's SentencePiece vocabulary (tokenizer.ggml.model llama) "
                                   f"was refused by sentencepiece: {' '.join(str(e).split())}") from None

    @staticmethod
    def _byte_level_bpe(vocab: Vocab) -> HFTokenizer:
        regexes, ignore_merges, _ = BPE_PRE[vocab.pre]
        # as above: `tokenizers` raises a bare Exception on a vocabulary it refuses
        try:
            hf = HFTokenizer(models.BPE(vocab.ids, vocab.merges, ignore_merges=ignore_merges))
        except Exception as e:
            raise HybridInferError(f"the GGUF file's BPE vocabulary (tokenizer.ggml.model gpt2) was refused "
                                   f"by tokenizers: {' '.join(str(e).split())}") from None
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return hf

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


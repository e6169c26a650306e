"""Small random llama GGUF files written in process with the gguf package's writer."""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

PIECES = ["▁the", "▁a", "▁and", "th", "he", "in", "er", "▁", "e", "t", "a", "o", "n", "s", "h", "r"]


def write_llama_gguf(path: Path, *, n_layer: int = 2, n_embd: int = 64, n_ff: int = 128, n_head: int = 4,
                     n_head_kv: int = 2, n_ctx: int = 64, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
                     tied: bool = False, arch: str = "llama", ffn_act: str | None = "relu", seed: int = 0,
                     drop_tensor: str | None = None) -> Path:
    """A random llama model with a SentencePiece-style vocabulary of byte pieces and a few words."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *PIECES]
    types = [2, 3, 3, *[6] * 256, *[1] * len(PIECES)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(PIECES))]]
    n_vocab = len(tokens)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    if ffn_act:
        w.add_string("hybridinfer.ffn_activation", ffn_act)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)

    head_dim = n_embd // n_head

    def matrix(name: str, n_out: int, n_in: int, kind: GGMLQuantizationType = qtype) -> None:
        values = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        if name == drop_tensor:
            return
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, values.astype(np.float16 if kind == GGMLQuantizationType.F16 else np.float32))
        else:
            try:
                blocks = quants.quantize(values, kind)
            except NotImplementedError:  # a type gguf cannot write: random bytes of the right size
                blocks = rng.integers(0, 256, quants.quant_shape_to_byte_shape(values.shape, kind), dtype=np.uint8)
            w.add_tensor(name, blocks, raw_dtype=kind)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", n_vocab, n_embd)
    for i in range(n_layer):
        vector(f"blk.{i}.attn_norm.weight", n_embd)
        matrix(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        matrix(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        vector(f"blk.{i}.ffn_norm.weight", n_embd)
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    vector("output_norm.weight", n_embd)
    if not tied:
        matrix("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

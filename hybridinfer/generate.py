"""Text generation: prefill the prompt, then decode one token at a time, timing both as llama.cpp does."""

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hybridinfer.errors import HybridInferError
from hybridinfer.model import Transformer
from hybridinfer.sampling import Sampler
from hybridinfer.tokenizer import Tokenizer


@dataclass
class Generation:
    ids: list[int] = field(default_factory=list)  # generated token ids, stop token excluded
    text: str = ""
    prompt_tokens: int = 0
    prompt_s: float = 0.0  # prefill time
    first_token_s: float = 0.0  # from the start of prefill to the first token's logits
    gen_s: float = 0.0  # decode time: one forward per generated token after the first
    stopped_by: str = "length"  # "length", "stop token", "context" or "interrupted" (Ctrl-C)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def gen_tps(self) -> float:
        return (len(self.ids) - 1) / self.gen_s if self.gen_s and len(self.ids) > 1 else 0.0


def generate(model: Transformer, tokenizer: Tokenizer, prompt: list[int], n_predict: int, sampler: Sampler,
             on_text: Callable[[str], None] = lambda text: None) -> Generation:
    """Generate up to n_predict tokens (-1: until a stop token or the context is full) after prompt."""
    if not prompt:
        raise HybridInferError("the prompt is empty and the model adds no BOS token: give a prompt")
    if len(prompt) >= model.n_ctx:
        raise HybridInferError(f"the prompt is {len(prompt)} tokens, longer than the context of "
                               f"{model.n_ctx} tokens: shorten it or raise -c")
    out = Generation(prompt_tokens=len(prompt))
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in prompt:
        sampler.accept(token)
    start = time.perf_counter()
    decode_start = None
    try:
        logits = model.forward(np.array(prompt), 0)[-1]
        decode_start = time.perf_counter()
        out.prompt_s = out.first_token_s = decode_start - start
        pos = len(prompt)
        while len(out.ids) != n_predict:
            token = sampler(logits)
            if token in tokenizer.stop_ids:
                out.stopped_by = "stop token"
                break
            sampler.accept(token)
            out.ids.append(token)
            piece = utf8.decode(tokenizer.piece(token))
            out.text += piece
            on_text(piece)
            if len(out.ids) == n_predict:
                break
            if pos >= model.n_ctx:
                out.stopped_by = "context"
                break
            logits = model.forward(np.array([token]), pos)[-1]
            pos += 1
    except KeyboardInterrupt:  # Ctrl-C: keep what was generated, so that its timings can be printed
        out.stopped_by = "interrupted"
        if decode_start is None:
            out.prompt_s = time.perf_counter() - start
    if decode_start is not None:
        out.gen_s = time.perf_counter() - decode_start
    tail = utf8.decode(b"", final=True)
    out.text += tail
    on_text(tail)
    return out

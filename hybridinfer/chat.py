"""Chat prompts: the GGUF's tokenizer.chat_template (a Hugging Face Jinja template) around a user message."""

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybridinfer.errors import HybridInferError
from hybridinfer.gguf_file import checked


RENDER_SECONDS = 2.0  # real templates render in milliseconds; a looping one is stopped after this
MAX_CHARS = 1 << 22  # longest rendered prompt, and longest result of one `*` in a template


def _raise(message: str):
    raise TemplateError(message)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox with limits on what a template from a file can make: `*` may not build a
    string or list longer than MAX_CHARS, `**` may not raise to powers above 1024."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise TemplateError(f"the power {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                    raise TemplateError(f"'*' would make {len(seq) * n} items, more than {MAX_CHARS}")
        return super().call_binop(context, operator, left, right)


@contextmanager
def _time_limit(seconds: float):
    """TemplateError when the block runs longer than seconds. Signals reach the main thread only: in
    other threads the block runs without a limit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateError(f"rendering took longer than {seconds:g} s (a loop that does not end?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_chat(meta: dict, user_message: str, template_file: Path | None = None) -> str:
    """The prompt text for one user turn, ready for the assistant's reply (special tokens as text)."""
    if template_file is not None:
        try:
            source = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HybridInferError(f"cannot read chat template '{template_file}': "
                                   f"{getattr(e, 'strerror', None) or e}") from None
    else:
        source = checked(meta, "tokenizer.chat_template", lambda v: isinstance(v, str), "a string",
                         "the file is damaged: give a template with --chat-template FILE")
        if source is None:
            raise HybridInferError("the model has no tokenizer.chat_template: give one with --chat-template FILE")

    tokens = meta.get("tokenizer.ggml.tokens", [])

    def token_text(key: str) -> str:
        index = meta.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else ""

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        with _time_limit(RENDER_SECONDS):
            parts, length = [], 0
            for part in env.from_string(source).generate(
                    messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                    bos_token=token_text("tokenizer.ggml.bos_token_id"),
                    eos_token=token_text("tokenizer.ggml.eos_token_id")):
                parts.append(part)
                length += len(part)
                if length > MAX_CHARS:
                    raise TemplateError(f"it made a prompt of more than {MAX_CHARS} characters")
            return "".join(parts)
    except TemplateError as e:
        raise HybridInferError(f"the chat template failed: {e.message}") from None

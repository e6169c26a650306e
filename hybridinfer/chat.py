"""Chat prompts: the GGUF's tokenizer.chat_template (a Hugging Face Jinja template) around a user message."""

from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybridinfer.errors import HybridInferError


def _raise(message: str):
    raise TemplateError(message)


def render_chat(meta: dict, user_message: str, template_file: Path | None = None) -> str:
    """The prompt text for one user turn, ready for the assistant's reply (special tokens as text)."""
    if template_file is not None:
        try:
            source = template_file.read_text()
        except OSError as e:
            raise HybridInferError(f"cannot read chat template '{template_file}': {e.strerror}") from None
    elif "tokenizer.chat_template" in meta:
        source = meta["tokenizer.chat_template"]
    else:
        raise HybridInferError("the model has no tokenizer.chat_template: give one with --chat-template FILE")
    tokens = meta.get("tokenizer.ggml.tokens", [])

    def token_text(key: str) -> str:
        index = meta.get(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else ""

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source).render(
            messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
            bos_token=token_text("tokenizer.ggml.bos_token_id"), eos_token=token_text("tokenizer.ggml.eos_token_id"))
    except TemplateError as e:
        raise HybridInferError(f"the chat template failed: {e.message}") from None

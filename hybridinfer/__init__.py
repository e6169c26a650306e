"""hybridinfer: sparse-activation LLM inference on GGUF files (see README.md)."""

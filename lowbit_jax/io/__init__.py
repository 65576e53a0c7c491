"""Loaders and exporters: GGUF, llama2.c, tokenizers, the transformers model zoo."""

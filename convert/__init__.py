"""Readers (Hugging Face) and writers (GGUF, ONNX) of the canonical graph."""

"""The model: a Llama you can read top to bottom (``llama.py``) and its Hugging Face-compatible folder I/O (``hf.py``)."""

from lmforge.model.llama import KVCache, Llama, LlamaConfig

__all__ = ["KVCache", "Llama", "LlamaConfig"]

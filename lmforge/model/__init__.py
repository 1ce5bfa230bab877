"""The model: a Llama you can read top to bottom (``llama.py``, with the switches that make it a Qwen2/Qwen3/Mistral/
Gemma 3/Phi-3), which family is which (``families.py``), Hugging Face folder I/O (``hf.py``) and GGUF import
(``gguf_import.py``)."""

from lmforge.model.llama import KVCache, Llama, LlamaConfig

__all__ = ["KVCache", "Llama", "LlamaConfig"]

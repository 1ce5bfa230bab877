"""Export a model folder to the formats people deploy: GGUF for llama.cpp (``export_gguf``) and an HF folder that
``transformers`` and vLLM load (``export_hf``)."""

from lmforge.export.to_gguf import GGUF_DTYPES, export_gguf
from lmforge.export.hf import export_hf

__all__ = ["export_gguf", "export_hf", "GGUF_DTYPES"]

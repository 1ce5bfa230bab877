"""``--engine vllm``: serve the same model folder through vLLM's own OpenAI-compatible server (GPU machines).

vLLM loads our HF-layout folders as they are (``config.json`` is a valid ``LlamaConfig``, the tokenizer config carries
the chat template), so clients keep the same base URL, model name and API key when they move to a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


class VLLMNotInstalledError(RuntimeError):
    """``--engine vllm`` was asked for on a machine without vLLM."""


def vllm_command(model_dir: str | os.PathLike, host: str, port: int, model_name: str, max_model_len: int | None,
                 max_num_seqs: int, api_key: str | None = None) -> list[str]:
    """The command line that starts vLLM's OpenAI server for ``model_dir`` with our serve options."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(model_dir).resolve()),
           "--served-model-name", model_name, "--host", host, "--port", str(port), "--max-num-seqs",
           str(max_num_seqs)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise VLLMNotInstalledError(
            "--engine vllm needs vLLM, which is not installed in this environment. vLLM runs on CUDA GPUs: "
            "`pip install vllm` on a GPU machine, or use the default `--engine lmforge` (CPU or GPU).")


def serve_with_vllm(model_dir: str | os.PathLike, host: str, port: int, model_name: str,
                    max_model_len: int | None, max_num_seqs: int, api_key: str | None = None) -> int:
    """Run vLLM's server in the foreground until it exits; returns its exit code."""
    require_vllm()
    return subprocess.call(vllm_command(model_dir, host, port, model_name, max_model_len, max_num_seqs, api_key))

"""Candidate answers for a labelling project: ask a model for N answers to each prompt, to be rated, ranked and edited.

The model is a local model folder (loaded into lmforge's engine in this process for the time of the generation, then
freed) or any OpenAI-compatible endpoint (``http(s)://…/v1``, e.g. ``lmforge serve``).  Each of the N candidates of a
prompt gets its own seed (``seed + j``), so they differ when ``temperature > 0`` and a re-run gives the same answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.dashboard.store import PageError

MAX_CANDIDATES = 4  # answers a-d: the labelling keys


def generate(prompts: list[str], source: str, n: int = 2, max_tokens: int = 128, temperature: float = 0.8,
             seed: int = 0, model: str = "") -> list[list[dict[str, Any]]]:
    """For each prompt, ``n`` answers ``{"model", "text", "seed", ...}``; a bad source or setting is a PageError."""
    if not 1 <= n <= MAX_CANDIDATES:
        raise PageError(f"candidates: 1 to {MAX_CANDIDATES} per prompt (got {n})", 400)
    if not 1 <= max_tokens <= 4096:
        raise PageError(f"max tokens: 1 to 4096 (got {max_tokens})", 400)
    if not 0.0 <= temperature <= 2.0:
        raise PageError(f"temperature: 0 to 2 (got {temperature})", 400)
    source = source.strip()
    if source.startswith(("http://", "https://")):
        return _from_endpoint(prompts, source, n, max_tokens, temperature, seed, model)
    return _from_folder(prompts, source, n, max_tokens, temperature, seed)


def _from_folder(prompts: list[str], folder: str, n: int, max_tokens: int, temperature: float,
                 seed: int) -> list[list[dict[str, Any]]]:
    from lmforge.serve.api import ServeStartError, load_engine
    from lmforge.serve.sampling import SamplingParams

    try:
        engine = load_engine(folder, max_num_seqs=n, max_model_len=None)
    except (ServeStartError, ValueError) as err:
        raise PageError(f"cannot generate candidates with {folder}: {err}", 400) from None
    name = Path(folder).resolve().name
    out: list[list[dict[str, Any]]] = []
    try:
        stops = sorted(engine.chat_stop_token_ids)
        for prompt in prompts:
            ids = engine.encode_chat([{"role": "user", "content": prompt}])
            answers = []
            for j in range(n):
                params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + j,
                                        stop_token_ids=stops)
                try:
                    res = engine.generate_text(ids, params)
                except ValueError as err:  # a prompt too long for the model
                    raise PageError(f"cannot generate an answer to {prompt[:60]!r}: {err}", 400) from None
                answers.append({"model": f"{name} (seed {seed + j})", "text": res.text.strip(), "seed": seed + j,
                                "source": str(Path(folder).resolve()), "temperature": temperature})
            out.append(answers)
    finally:
        engine.shutdown()
    return out


def _from_endpoint(prompts: list[str], base_url: str, n: int, max_tokens: int, temperature: float, seed: int,
                   model: str) -> list[list[dict[str, Any]]]:
    import openai

    client = openai.OpenAI(base_url=base_url.rstrip("/"), api_key="none", max_retries=0, timeout=300)
    out: list[list[dict[str, Any]]] = []
    try:
        model = model or client.models.list().data[0].id
        for prompt in prompts:
            answers = []
            for j in range(n):  # one request per candidate: each its own seed, as with a model folder
                resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                      max_tokens=max_tokens, temperature=temperature, seed=seed + j)
                answers.append({"model": f"{model} (seed {seed + j})", "text": (resp.choices[0].message.content or
                                                                                "").strip(),
                                "seed": seed + j, "source": base_url, "response_id": resp.id,
                                "temperature": temperature})
            out.append(answers)
    except (openai.OpenAIError, IndexError) as err:
        raise PageError(f"cannot generate candidates at {base_url}: {type(err).__name__}: {err}", 502) from None
    return out

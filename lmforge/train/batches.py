"""Batches of random windows from packed token streams, a pure function of (seed, step).

Because batch ``s`` depends only on the seed and ``s``, the data cursor of a checkpoint is just its step number and a
resumed run sees exactly the batches an uninterrupted run would have seen.  The same holds for a *mixture* of sources:
each row first draws its source with the target weights of that step (a curriculum interpolates the weights linearly
over training), then a window inside that source.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _window(tokens: np.ndarray, start: int, seq_len: int) -> np.ndarray:
    return np.asarray(tokens[start:start + seq_len + 1], dtype=np.int64)


def _check(tokens: np.ndarray, seq_len: int, name: str = "") -> None:
    if len(tokens) < seq_len + 2:
        raise ValueError(f"{name + ': ' if name else ''}only {len(tokens)} tokens: too few for windows of "
                         f"{seq_len + 1}; use a shorter seq_len or more data")


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of shape [batch_size, seq_len]: windows at random offsets of ``tokens``."""
    _check(tokens, seq_len)
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    w = torch.from_numpy(np.stack([_window(tokens, s, seq_len) for s in starts]))
    return w[:, :-1], w[:, 1:]


def mixture_weights_at(step: int, max_steps: int, start: Sequence[float], end: Sequence[float] | None = None) -> np.ndarray:
    """Normalised source weights at ``step``: ``start`` (constant), or linearly moving to ``end`` at ``max_steps``."""
    w0 = np.asarray(start, dtype=np.float64)
    w = w0 if not end else w0 + (np.asarray(end, dtype=np.float64) - w0) * min(1.0, step / max(1, max_steps))
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum, got {list(w)}")
    return w / w.sum()


def sample_mixture_batch(sources: Sequence[np.ndarray], weights: np.ndarray, batch_size: int, seq_len: int, seed: int,
                         step: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Like ``sample_batch`` over several sources: ``(inputs, targets, source index of each row)``."""
    for i, s in enumerate(sources):
        if weights[i] > 0:
            _check(s, seq_len, f"mixture source {i}")
    rng = np.random.default_rng([seed, step])
    which = rng.choice(len(sources), size=batch_size, p=weights)
    rows = []
    for src in which:
        tokens = sources[src]
        rows.append(_window(tokens, int(rng.integers(0, len(tokens) - seq_len - 1)), seq_len))
    w = torch.from_numpy(np.stack(rows))
    return w[:, :-1], w[:, 1:], which

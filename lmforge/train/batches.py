"""Batches of random windows from a packed token stream, a pure function of (seed, step).

Because batch ``s`` depends only on the seed and ``s``, the data cursor of a checkpoint is just its step number and a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of shape [batch_size, seq_len]: windows at random offsets of ``tokens``."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"only {len(tokens)} tokens: too few for windows of {seq_len + 1}; "
                         f"use a shorter seq_len or more data")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]

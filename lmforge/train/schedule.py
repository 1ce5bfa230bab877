"""Learning-rate schedules, as pure functions of the step.

* ``cosine``: linear warmup, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``.
* ``wsd`` (warmup-stable-decay): linear warmup, a constant plateau at ``lr``, then a linear decay to
  ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps.  The plateau makes it easy to branch off
  longer runs: only the decay phase depends on ``max_steps``.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "wsd"]


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
          schedule: Schedule = "cosine", decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return lr * min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return lr * (1 - (1 - min_lr_ratio) * progress)
    raise ValueError(f"unknown schedule {schedule!r} (expected 'cosine' or 'wsd')")

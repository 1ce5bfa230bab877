"""Activation checkpointing applied from outside the model: each decoder layer keeps only its input during the
forward pass and recomputes its activations in the backward pass (less memory, ~1/3 more compute).

The wrapper replaces the layers' ``forward`` on the instance, so parameter names, ``state_dict`` keys and
checkpoints are unchanged and ``lmforge/model/llama.py`` knows nothing about it.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.model.llama import Llama


def apply_activation_checkpointing(model: Llama) -> int:
    """Wrap every decoder layer of ``model`` in ``torch.utils.checkpoint``; returns how many were wrapped."""
    wrapped = 0
    for layer in model.model.layers:
        if getattr(layer, "_lmforge_checkpointed", False):
            continue
        _wrap(layer)
        wrapped += 1
    return wrapped


def _wrap(layer: nn.Module) -> None:
    inner = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        # non-reentrant checkpointing: works with keyword and non-tensor arguments, autocast and torch.compile
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    layer.forward = forward
    layer._lmforge_checkpointed = True

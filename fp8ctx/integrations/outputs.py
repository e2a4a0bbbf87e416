"""The main tensor of a model output: diffusers' ``DecoderOutput`` / ``AutoencoderKLOutput``, transformers'
``ModelOutput`` classes, dicts, tuples, or a plain tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["first_tensor"]

# the fields diffusers and transformers outputs carry their result in, most specific first
_MAIN_FIELDS = ("sample", "last_hidden_state", "logits", "latent", "latent_dist")


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of ``output`` (``sample``, ``last_hidden_state``, ``logits``, a latent distribution's
    mode, or the first tensor of a tuple/dict).

    Raises:
        TypeError: no tensor in the output.

    Example:
        >>> first_tensor({"logits": torch.zeros(2), "hidden_states": None}).shape
        torch.Size([2])
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in _MAIN_FIELDS:
        value = getattr(output, key, None) if not isinstance(output, Mapping) else output.get(key)
        if value is not None:
            # a latent distribution (DiagonalGaussianDistribution) reports its mode
            return value.mode() if hasattr(value, "mode") and not isinstance(value, torch.Tensor) else first_tensor(value)
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"cannot find a tensor in the model output of type {type(output).__name__}; pass run= returning one")

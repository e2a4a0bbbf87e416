"""transformers' own layer types, as planning sees them (looked up among loaded modules, never imported).

A model built from transformers' classes has imported them, so looking in ``sys.modules`` is enough: when
``transformers.pytorch_utils`` is not loaded, no ``Conv1D`` can exist.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["EXPERT_COUNTS", "conv1d_type", "experts_transposed"]

# the attribute naming the expert count on transformers' experts modules (every class that
# `use_experts_implementation` decorates sets `num_experts`; the others are spellings of older code)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def conv1d_type() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear, its weight stored (in, out)) if loaded, else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def experts_transposed(layer: nn.Module) -> bool:
    """Whether an experts module stores each expert (in, out) rather than (out, in): transformers'
    ``use_experts_implementation(is_transposed=True)`` (gpt-oss) sets ``is_transposed``."""
    return getattr(layer, "is_transposed", False) is True

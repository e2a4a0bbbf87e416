"""A tqdm bar over a long loop, when tqdm is installed (it is optional)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["progress"]

# below this many layers quantizing takes a moment; a bar would only flicker
_MIN_ITEMS = 64


def progress(items: Sequence[Any], description: str, enabled: bool | None) -> Iterable[Any]:
    """``items``, wrapped in a tqdm bar when ``enabled`` is True, or (``None``) when there are many and tqdm
    is installed."""
    if enabled is False or (enabled is None and len(items) < _MIN_ITEMS):
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="layer", leave=False)

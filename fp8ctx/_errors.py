"""The library's one exception class."""

from __future__ import annotations

__all__ = ["FP8Error"]


class FP8Error(ValueError):
    """Raised by fp8ctx for inputs it cannot work with.

    It subclasses ``ValueError`` so code that guards option parsing with ``except ValueError`` keeps
    working. Messages name the layer or option, say what was expected and what came, and the way out.
    """

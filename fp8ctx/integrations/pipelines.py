"""diffusers pipelines passed to ``fp8_weights``: how one is recognised and which components it holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .._errors import FP8Error

__all__ = ["DEFAULT_COMPONENTS", "is_pipeline", "pipeline_modules"]

DEFAULT_COMPONENTS = ("vae", "text_encoder")
"""The components held when a pipeline is passed without ``components=``."""


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers ``DiffusionPipeline`` (or a look-alike: a non-module with a
    ``components`` dict); duck-typed so that diffusers need not be installed."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), Mapping)


def pipeline_modules(pipe: Any, components: Sequence[str] | None) -> dict[str, nn.Module]:
    """The pipeline's module components named in ``components`` (default :data:`DEFAULT_COMPONENTS`), by name.

    Raises:
        FP8Error: a name that is not a module component of the pipeline (lists the ones it has).

    Example:
        >>> class Pipe:
        ...     components = {"vae": torch.nn.Linear(2, 2), "scheduler": object()}
        >>> list(pipeline_modules(Pipe(), ["vae"]))
        ['vae']
    """
    names = tuple(components) if components is not None else DEFAULT_COMPONENTS
    available = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    missing = [name for name in names if name not in available]
    if missing:
        raise FP8Error(
            f"{type(pipe).__name__} has no module component(s) {missing}; components= takes some of {sorted(available)}"
        )
    return {name: available[name] for name in names}

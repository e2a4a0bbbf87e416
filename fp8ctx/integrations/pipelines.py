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
    """The pipeline's module components named in ``components``, by name; without ``components``, those of
    :data:`DEFAULT_COMPONENTS` that the pipeline has loaded (a component can be ``None``: a pipeline built
    without its text encoder).

    Raises:
        FP8Error: a name that is not a module component of the pipeline, or one that is ``None`` there (lists
            the module components it has), or no default component loaded.

    Example:
        >>> class Pipe:
        ...     components = {"vae": torch.nn.Linear(2, 2), "text_encoder": None, "scheduler": object()}
        >>> list(pipeline_modules(Pipe(), None)), list(pipeline_modules(Pipe(), ["vae"]))
        (['vae'], ['vae'])
    """
    available = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    kind = type(pipe).__name__
    if components is None:
        names = [name for name in DEFAULT_COMPONENTS if name in available]
        if not names:
            raise FP8Error(
                f"{kind} has none of the default components {list(DEFAULT_COMPONENTS)} loaded; pass components= "
                f"with some of its module components {sorted(available)}"
            )
        return {name: available[name] for name in names}
    unloaded = [name for name in components if name in pipe.components and pipe.components[name] is None]
    missing = [name for name in components if name not in available and name not in unloaded]
    if missing or unloaded:
        problems = [f"no module component(s) {missing}"] if missing else []
        problems += [f"component(s) {unloaded} set to None (not loaded)"] if unloaded else []
        raise FP8Error(f"{kind} has {' and '.join(problems)}; components= takes some of {sorted(available)}")
    return {name: available[name] for name in components}

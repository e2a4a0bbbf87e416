"""Running a model for a measurement: the caller's inputs or ``run``, eval mode, no gradients, the main tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import FP8Error
from .integrations.outputs import first_tensor

__all__ = ["caller", "measuring", "output_of"]


def caller(inputs: Any, run: Callable[[nn.Module], Any] | None, *, required: bool = True) -> Callable[[nn.Module], Any] | None:
    """``run``, or a function that calls the model on ``inputs`` (a tensor, a tuple of positional arguments or
    a dict of keyword arguments).

    Raises:
        FP8Error: ``run`` is not callable, both or (when ``required``) neither are given.
    """
    if run is not None and not callable(run):
        raise FP8Error(f"run must be a function run(model) -> output, got {type(run).__name__}")
    if run is not None and inputs is not None:
        raise FP8Error("pass inputs or run=, not both (run(model) calls the model itself)")
    if run is not None:
        return run
    if inputs is None:
        if required:
            raise FP8Error("this measures the model's output: pass inputs (a tensor, tuple or dict) or run=lambda model: ...")
        return None
    if isinstance(inputs, Mapping):
        return lambda model: model(**inputs)
    if isinstance(inputs, tuple):
        return lambda model: model(*inputs)
    return lambda model: model(inputs)


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; each module's training flag put back after.

    Dropout would make a comparison noise, and batch-norm statistics updated by a training-mode forward would
    change the model.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def output_of(call: Callable[[nn.Module], Any], model: nn.Module) -> torch.Tensor:
    """The main tensor of ``call(model)``, detached and copied (outputs may be views of reused buffers)."""
    return first_tensor(call(model)).detach().clone()

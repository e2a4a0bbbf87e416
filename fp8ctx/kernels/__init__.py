"""The one dispatch point for FP8 weight math: a fused GPU kernel where one applies, pure torch elsewhere.

Every function here computes exactly what ``_numerics.dequantize`` followed by the dense torch op computes
(to the rounding of the compute dtype). The Triton kernels in ``_triton`` are used when Triton imports, the
tensors are on a CUDA device that supports FP8 conversion, and the backend is ``"auto"``; the pure-torch path
runs everywhere else (CPU, older GPUs, CI).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import _numerics
from .._errors import FP8Error

__all__ = ["BACKENDS", "dequantize", "embedding", "get_backend", "linear", "use_backend"]

BACKENDS = ("auto", "torch")
_backend = os.environ.get("FP8CTX_BACKEND", "auto")


def get_backend() -> str:
    """The active backend: ``"auto"`` (fused kernels where they apply) or ``"torch"`` (always pure torch)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select the backend inside a ``with`` block (benchmarks compare both in one process).

    Raises:
        FP8Error: ``name`` is not one of ``BACKENDS``.

    Example:
        >>> with use_backend("torch"):
        ...     pass
    """
    global _backend
    if name not in BACKENDS:
        raise FP8Error(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


@functools.lru_cache(maxsize=None)
def _triton_module() -> ModuleType | None:
    try:
        from . import _triton
    except Exception:  # Triton missing or unusable on this platform: the torch path is always correct
        return None
    return _triton


def _tracing(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Under torch.compile the launchers cannot run on fake tensors; the torch path traces (and fuses) fine."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) for t in tensors)


def _fused(*tensors: torch.Tensor) -> ModuleType | None:
    """The Triton module if the fused path applies to these tensors, else None."""
    if _backend != "auto" or not all(t.is_cuda for t in tensors) or _tracing(tensors):
        return None
    module = _triton_module()
    if module is None or not module.is_supported(*tensors):
        return None
    return module


def linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(data, scale), bias)`` for an FP8 weight of shape ``(N, K)``.

    Returns:
        ``(..., N)`` in the dtype ``F.linear`` gives for ``x`` and a ``dtype`` weight.
    """
    fused = _fused(x, data) if x.dtype == dtype else None
    if fused is not None:
        return fused.w8a16_linear(x, data, scale, granularity, block_size, bias)
    return F.linear(x, _numerics.dequantize(data, scale, dtype, granularity, block_size, 0), bias)


def dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block_size: int,
    channel_axis: int,
) -> torch.Tensor:
    """A dense copy of an FP8 weight, in one pass on the GPU (``_numerics.dequantize`` elsewhere)."""
    fused = _fused(data) if channel_axis == 0 and data.dim() >= 1 else None
    if fused is not None:
        matrix = data.reshape(data.shape[0], -1)
        return fused.dequantize(matrix, scale, granularity, block_size, dtype).reshape(data.shape)
    return _numerics.dequantize(data, scale, dtype, granularity, block_size, channel_axis)


def embedding(
    indices: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block_size: int,
) -> torch.Tensor:
    """Rows ``indices`` of an FP8 table, dequantized (only the looked-up rows are touched)."""
    fused = _fused(data)
    if fused is not None and hasattr(fused, "embedding"):
        return fused.embedding(indices, data, scale, granularity, block_size, dtype)
    return _numerics.dequantize_rows(data, scale, indices, dtype, granularity, block_size)

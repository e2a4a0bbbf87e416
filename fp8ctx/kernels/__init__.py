"""The one dispatch point for FP8 weight math: fused GPU kernels where they apply, pure torch elsewhere.

Every function here computes exactly what ``_numerics.dequantize`` followed by the dense torch op computes (to
the rounding of the compute dtype), whichever way it runs:

* in eager mode on plain tensors, the implementation is called directly (``_impl``: the Triton kernels on a
  CUDA GPU that supports FP8 conversion, pure torch elsewhere) — no dispatcher on the hot path;
* under a tracer (``torch.compile``, ``torch.export``, ``make_fx``) or on tensor subclasses, the call goes
  through the registered op (``torch.ops.fp8ctx.linear`` and its siblings, ``_library``), which the graph
  records as one node with a fake implementation for shapes and which runs the same implementation — except
  on the GPU without gradients where the call's route is plain torch work: dequantize + cuBLAS
  (``_impl.linear_in_torch_ops``) and FP8 compute's per-token rounding + ``torch._scaled_mm``
  (``_impl.fp8_linear_in_torch_ops``) are traced as torch ops, so the compiler fuses the elementwise parts
  with their neighbours and launches them without a custom op's dispatch.

``use_backend("torch")`` switches the fused kernels off (benchmarks compare both in one process). On the GPU,
which of the fused kernel and dequantize + cuBLAS runs a given shape is measured once and remembered
(:func:`set_tuning`, ``_route``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .._errors import FP8Error
from .._layout import FP8Layout
from . import _impl
from ._impl import BACKENDS, fp8_compute_supported
from ._library import layout_args, ops
from ._route import routes as tuned_routes
from ._route import set_tuning

__all__ = [
    "BACKENDS",
    "dequantize",
    "embedding",
    "fp8_compute_supported",
    "fp8_linear",
    "get_backend",
    "linear",
    "set_tuning",
    "tuned_routes",
    "use_backend",
]


def get_backend() -> str:
    """The active backend: ``"auto"`` (fused kernels where they apply) or ``"torch"`` (always pure torch)."""
    return _impl.backend[0]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select the backend inside a ``with`` block.

    Raises:
        FP8Error: ``name`` is not one of ``BACKENDS``.

    Example:
        >>> with use_backend("torch"):
        ...     get_backend()
        'torch'
    """
    if name not in BACKENDS:
        raise FP8Error(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _impl.backend[0] = _impl.backend[0], name
    try:
        yield
    finally:
        _impl.backend[0] = previous


def _eager(*tensors: torch.Tensor) -> bool:
    """Plain tensors outside any tracer or dispatch mode: call the implementation directly. A tracer's fake or
    functional tensors, other subclasses, and calls under a mode (AOT autograd, make_fx) go through the op."""
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and all(type(t) is torch.Tensor for t in tensors)
        and not torch.compiler.is_compiling()
    )


def linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(data, scale), bias)`` for an FP8 weight of shape ``(N, K)``.

    Args:
        x: ``(..., K)`` activations.
        data, scale: the FP8 codes and their scales (``layout.scale_shape``).
        layout: the weight's scheme (channel axis 0).
        dtype: the dtype the weight is dequantized to (the layer's compute dtype).
        bias: optional ``(N,)``, fused into the GEMM's epilogue on the GPU.

    Returns:
        ``(..., N)`` in the dtype ``F.linear`` gives for ``x`` and a ``dtype`` weight.
    """
    if _eager(x, data):
        return _impl.linear(x, data, scale, layout, dtype, bias)
    traced = _impl.linear_in_torch_ops(x, data, scale, layout, dtype, bias)
    if traced is not None:
        return traced
    return ops.linear(x, data, scale, *layout_args(layout)[:2], dtype, bias)


def fp8_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with the activations rounded to e4m3 per token as well: an FP8 x FP8 matmul.

    On CUDA GPUs with FP8 tensor cores (sm_89+) this is one fused quantization kernel plus ``torch._scaled_mm``
    with row-wise scales (``scale_x[t] * scale_w[n]``) and the bias in its epilogue; elsewhere an exact emulation
    in float32. Its error is that of W8A16 plus the rounding of the activations (e4m3: 3 mantissa bits).
    Weights that FP8 compute cannot use (see :func:`fp8_compute_supported`) take :func:`linear`.

    Returns:
        ``(..., N)`` in ``dtype``.
    """
    if _eager(x, data):
        return _impl.fp8_linear(x, data, scale, layout, dtype, bias)
    traced = _impl.fp8_linear_in_torch_ops(x, data, scale, layout, dtype, bias)
    if traced is not None:
        return traced
    return ops.fp8_linear(x, data, scale, *layout_args(layout)[:2], dtype, bias)


def dequantize(data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype) -> torch.Tensor:
    """A dense copy of an FP8 weight of any shape, in one pass on the GPU (``_numerics.dequantize`` elsewhere)."""
    # a batched (mixture-of-experts) layout has no op arguments: it takes the pure-torch path, traced as it is
    if _eager(data) or layout.batch_dims:
        return _impl.dequantize(data, scale, layout, dtype)
    return ops.dequantize(data, scale, *layout_args(layout), dtype)


def embedding(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``indices`` of an FP8 table, dequantized (only the looked-up rows are touched)."""
    if _eager(indices, data):
        return _impl.embedding(indices, data, scale, layout, dtype)
    return ops.embedding(indices, data, scale, *layout_args(layout)[:2], dtype)

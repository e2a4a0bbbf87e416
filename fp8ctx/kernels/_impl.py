"""The eager implementations behind the dispatch point: the Triton kernels where they apply, pure torch
everywhere else. The registered torch ops (``_library``) run these same functions.

Every function computes what ``_numerics.dequantize`` followed by the dense torch op computes (to the rounding
of the compute dtype). The fused path is taken when the backend is ``"auto"``, Triton imports and the tensors
are on a CUDA device that supports FP8 conversion.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import _numerics
from .._layout import FP8Layout, Granularity
from . import _route
from ._capability import capability
from ._quantize import ACTIVATION_DTYPE, quantize_rows_torch

__all__ = ["dequantize", "embedding", "fp8_compute_supported", "fp8_linear", "linear"]

BACKENDS = ("auto", "torch")
backend = [os.environ.get("FP8CTX_BACKEND", "auto")]


@functools.lru_cache(maxsize=None)
def triton_module() -> ModuleType | None:
    """The Triton backend, or None where Triton is missing or unusable (the torch path is always correct)."""
    try:
        from . import _triton
    except Exception:
        return None
    return _triton if _triton.HAS_TRITON else None


def _fused(*tensors: torch.Tensor) -> ModuleType | None:
    if backend[0] != "auto" or not tensors[0].is_cuda:
        return None
    module = triton_module()
    if module is None or not module.is_supported(*tensors):
        return None
    return module


def linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(data, scale), bias)`` for an FP8 weight ``(N, K)``."""
    fused = _fused_linear(x, data, layout, dtype)
    if fused is not None:
        return fused.w8a16_linear(x, data, scale, layout, bias)
    return F.linear(x, _numerics.dequantize(data, scale, layout, dtype), bias)


def _fused_linear(x: torch.Tensor, data: torch.Tensor, layout: FP8Layout, dtype: torch.dtype) -> ModuleType | None:
    """The Triton backend where it can run this linear (one route of two, see ``_route``), else None."""
    # the fused kernel's K tiles must divide a scale block: block sizes need a factor of 16
    tiles_fit = layout.granularity is not Granularity.BLOCK or layout.block_size % 16 == 0
    return _fused(x, data) if x.dtype == dtype and tiles_fit else None


def _needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def linear_in_torch_ops(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`linear` for a tracer, as dequantize + ``F.linear`` in torch ops, where that is the route this shape
    takes on the GPU: the compiler then launches its own dequantize kernel beside the GEMM instead of a custom op
    whose dispatch costs more host time than the call's GPU work at small sizes. None where the registered op must
    be recorded: the fused kernel is this shape's route (measured now on made-up inputs of the call's sizes where
    no call measured it before), sizes are symbolic, the call is off the GPU (the op
    records the same math there), or gradients are to be computed (the op's formula rebuilds the dense weight
    in backward instead of saving it)."""
    if _needs_grad(x, bias) or not x.is_cuda or backend[0] != "auto" or data.dim() != 2:
        return None
    n, k = data.shape
    tokens = x.numel() // k if k else 0
    if not all(isinstance(size, int) for size in (tokens, n, k)) or 0 in (tokens, n, k):
        return None
    fused = _fused_linear(x, data, layout, dtype)
    if fused is not None:
        has_bias = bias is not None
        key = _route.key_of(tokens, n, k, x.dtype, x.device, layout, data.dtype, has_bias)

        def measure() -> None:
            fused.measure_route(tokens, n, k, x.dtype, x.device, layout, data.dtype, has_bias)

        if _route.for_tracer(key, tokens, n, k, measure) != "dequant":
            return None
    return F.linear(x, _numerics.dequantize(data, scale, layout, dtype), bias)


def dequantize(data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype) -> torch.Tensor:
    """A dense copy of an FP8 weight, in one pass on the GPU."""
    fused = _fused(data) if layout.channel_axis == 0 and data.dim() >= 1 else None
    if fused is not None:
        matrix = data.reshape(layout.matrix_shape(data.shape))
        return fused.dequantize(matrix, scale, layout, dtype).reshape(data.shape)
    return _numerics.dequantize(data, scale, layout, dtype)


def embedding(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``indices`` of an FP8 table, dequantized (only the looked-up rows are touched)."""
    fused = _fused(data) if indices.is_cuda else None
    if fused is not None:
        return fused.embedding(indices, data, scale, layout, dtype)
    return _numerics.dequantize_rows(data, scale, indices, layout, dtype)


def fp8_compute_supported(layout: FP8Layout) -> bool:
    """Whether FP8 compute can use weights stored as ``layout``: e4m3 codes with one scale per output row
    (``"tensor"`` or ``"channel"``), as FP8 tensor-core matmuls with row-wise scaling need.

    Example:
        >>> fp8_compute_supported(FP8Layout("channel")), fp8_compute_supported(FP8Layout("block"))
        (True, False)
    """
    return layout.storage_dtype == ACTIVATION_DTYPE and layout.granularity in (Granularity.TENSOR, Granularity.CHANNEL)


def _scaled_mm_applies(x2d: torch.Tensor, data: torch.Tensor) -> bool:
    if backend[0] != "auto" or not (x2d.is_cuda and data.is_cuda) or x2d.dtype not in (torch.bfloat16, torch.float16):
        return False
    n, k = data.shape
    # FP8 tensor-core GEMMs need sm_89+ and both matrix dims in multiples of 16
    return n % 16 == 0 and k % 16 == 0 and capability(data.device) >= (8, 9)


def fp8_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with the activations rounded to e4m3 per token as well: an FP8 x FP8 matmul, the bias
    added in float32 before the one rounding to ``dtype`` (by ``torch._scaled_mm``'s epilogue on the GPU)."""
    if not fp8_compute_supported(layout) or x.dtype != dtype:
        return linear(x, data, scale, layout, dtype, bias)
    n, k = data.shape
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    if _scaled_mm_applies(x2d, data):
        fused = triton_module()
        out = _scaled_mm_linear(x2d, data, scale, dtype, bias, fused.quantize_rows if fused else quantize_rows_torch)
    else:
        q, x_scales = quantize_rows_torch(x2d)
        # the emulation: exact products of FP8 values, summed in float32, scaled, bias added, rounded once
        out = (q.float() @ data.float().t()) * x_scales * _row_scales(scale, n)
        if bias is not None:
            out = out + bias.to(dtype).float()
        out = out.to(dtype)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)


def fp8_linear_in_torch_ops(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`fp8_linear` for a tracer, written in torch ops (the per-token rounding, then ``torch._scaled_mm``)
    so that ``torch.compile`` fuses the rounding into the kernel that produced ``x`` instead of running it as a
    pass of its own. None where the registered op must be recorded instead: no FP8 GEMM on this device, or
    gradients to compute (``torch._scaled_mm`` has no derivative; the op has a formula)."""
    if _needs_grad(x, bias) or not fp8_compute_supported(layout) or x.dtype != dtype:
        return None
    n, k = data.shape
    x2d = x.reshape(-1, k)
    if not _scaled_mm_applies(x2d, data):
        return None
    return _scaled_mm_linear(x2d, data, scale, dtype, bias, quantize_rows_torch).reshape(*x.shape[:-1], n)


def _row_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    # (1, N): one factor per output channel (a view for "channel"; "tensor" repeats its one scale)
    return scale.view(1, n) if scale.dim() == 1 else scale.reshape(1, 1).expand(1, n).contiguous()


def _scaled_mm_linear(x2d, data, scale, dtype, bias, quantize_rows) -> torch.Tensor:
    q, x_scales = quantize_rows(x2d)
    return torch._scaled_mm(
        q, data.t(), scale_a=x_scales, scale_b=_row_scales(scale, data.shape[0]),
        bias=None if bias is None else bias.to(dtype), out_dtype=dtype,
    )  # fmt: skip

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
from .._layout import FP8Layout, Granularity

__all__ = [
    "BACKENDS",
    "dequantize",
    "embedding",
    "fp8_compute_supported",
    "fp8_linear",
    "get_backend",
    "linear",
    "use_backend",
]

BACKENDS = ("auto", "torch")
_backend = os.environ.get("FP8CTX_BACKEND", "auto")

# FP8 compute (fp8_linear) rounds activations to e4m3, one scale per token
_ACTIVATION_DTYPE = torch.float8_e4m3fn
_ACTIVATION_MAX = float(torch.finfo(_ACTIVATION_DTYPE).max)


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
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(data, scale, layout, dtype), bias)`` for an FP8 weight of shape ``(N, K)``.

    Returns:
        ``(..., N)`` in the dtype ``F.linear`` gives for ``x`` and a ``dtype`` weight.
    """
    # the fused kernel's K tiles must divide a scale block: block sizes need a factor of 16
    tiles_fit = layout.granularity is not Granularity.BLOCK or layout.block_size % 16 == 0
    fused = _fused(x, data) if x.dtype == dtype and tiles_fit else None
    if fused is not None:
        return fused.w8a16_linear(x, data, scale, layout, bias)
    return F.linear(x, _numerics.dequantize(data, scale, layout, dtype), bias)


def dequantize(data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype) -> torch.Tensor:
    """A dense copy of an FP8 weight, in one pass on the GPU (``_numerics.dequantize`` elsewhere)."""
    fused = _fused(data) if layout.channel_axis == 0 and data.dim() >= 1 else None
    if fused is not None:
        matrix = data.reshape(layout.matrix_shape(data.shape))
        return fused.dequantize(matrix, scale, layout, dtype).reshape(data.shape)
    return _numerics.dequantize(data, scale, layout, dtype)


def embedding(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``indices`` of an FP8 table, dequantized (only the looked-up rows are touched)."""
    fused = _fused(data)
    if fused is not None and hasattr(fused, "embedding"):
        return fused.embedding(indices, data, scale, layout, dtype)
    return _numerics.dequantize_rows(data, scale, indices, layout, dtype)


def fp8_compute_supported(layout: FP8Layout) -> bool:
    """Whether FP8 compute can use weights stored as ``layout``: e4m3 codes with one scale per output row
    (``"tensor"`` or ``"channel"``), as FP8 tensor-core matmuls with row-wise scaling need.

    Example:
        >>> fp8_compute_supported(FP8Layout("channel")), fp8_compute_supported(FP8Layout("block"))
        (True, False)
    """
    return layout.storage_dtype == _ACTIVATION_DTYPE and layout.granularity in (Granularity.TENSOR, Granularity.CHANNEL)


def _quantize_rows_torch(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization in plain torch: ``(q, scale)`` with ``x ≈ q * scale``, scales by the library's
    one rule (``_numerics.scale_from_amax``); ``_triton.quantize_rows`` computes the same bits on the GPU."""
    # float32: the division below must round only once, at the cast
    values = x2d.float()
    scale = _numerics.scale_from_amax(values.abs().amax(dim=1, keepdim=True), _ACTIVATION_MAX)
    # clamp: e4m3fn has no infinity; an overflow would become NaN
    return (values / scale).clamp(-_ACTIVATION_MAX, _ACTIVATION_MAX).to(_ACTIVATION_DTYPE), scale


def _scaled_mm_applies(x2d: torch.Tensor, data: torch.Tensor) -> bool:
    if _backend != "auto" or not (x2d.is_cuda and data.is_cuda) or x2d.dtype not in (torch.bfloat16, torch.float16):
        return False
    n, k = data.shape
    # FP8 tensor-core GEMMs need sm_89+ and both matrix dims in multiples of 16
    return torch.cuda.get_device_capability(data.device) >= (8, 9) and n % 16 == 0 and k % 16 == 0


def fp8_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` with the activations rounded to e4m3 per token as well: an FP8 x FP8 matmul.

    On CUDA GPUs with FP8 tensor cores (sm_89+) this is one fused quantization kernel plus
    ``torch._scaled_mm`` with row-wise scales (``scale_x[t] * scale_w[n]``); elsewhere an exact emulation
    in float32. Its error is that of W8A16 plus the rounding of the activations (e4m3: 3 mantissa bits).
    Weights that FP8 compute cannot use (see :func:`fp8_compute_supported`) take :func:`linear`.

    Returns:
        ``(..., N)`` in ``dtype``.
    """
    if not fp8_compute_supported(layout) or x.dtype != dtype:
        return linear(x, data, scale, layout, dtype, bias)
    n, k = data.shape
    x2d = x.reshape(-1, k)
    row_scales = scale.reshape(1, -1).expand(1, n).contiguous()  # (1, N): one factor per output channel
    if _scaled_mm_applies(x2d, data):
        fused = None if _tracing((x2d,)) else _triton_module()
        q, x_scales = fused.quantize_rows(x2d) if fused is not None else _quantize_rows_torch(x2d)
        out = torch._scaled_mm(q, data.t(), scale_a=x_scales, scale_b=row_scales, out_dtype=dtype)
    else:
        q, x_scales = _quantize_rows_torch(x2d)
        # the emulation: exact products of FP8 values, summed in float32, scaled, rounded once
        out = ((q.float() @ data.float().t()) * x_scales * row_scales).to(dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], n)

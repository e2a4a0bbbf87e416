"""The Triton backend's entry points: what the dispatch point (``fp8ctx.kernels``) calls on a CUDA GPU.

Storage contract (fixed by the core): a Linear weight ``W`` of shape ``(N, K)`` is stored as ``data``
(float8_e4m3fn or float8_e5m2, shape (N, K)) plus float32 scales MULTIPLIED on dequantize, of shape
``layout.scale_shape((N, K))``. Reference semantics: ``Wd = (data.float() * scale_b).to(x.dtype)`` and
``y = F.linear(x, Wd, bias)``.

The pieces live by concern: availability (``_capability``), the in-register FP8 decode (``_decode``), the
launcher and split-K workspace (``_launch``), tile configurations and launch plans (``_plan``), the fused
kernel (``_w8a16``), dequantize and embedding (``_dequant``), the per-token quantizer (``_quantize``) and
the measured route choice (``_route``). Numbers and the design's history: bench/KERNEL_NOTES.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._errors import FP8Error
from .._layout import FP8Layout
from . import _route
from ._capability import ACT_DTYPES, FP8_DTYPES, HAS_TRITON, is_supported, require_triton
from ._dequant import check_scale, dequantize, embedding
from ._plan import KernelConfig
from ._quantize import quantize_rows
from ._w8a16 import fused_linear, plan_for

__all__ = ["HAS_TRITON", "dequantize", "embedding", "is_supported", "quantize_rows", "w8a16_linear"]


def w8a16_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    bias: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    route: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequantize(data, scale), bias)`` on the GPU, by the measured-fastest route.

    Args:
        x: ``(..., K)`` bfloat16 or float16 CUDA tensor, any strides.
        data: ``(N, K)`` float8_e4m3fn / float8_e5m2 (made contiguous if not).
        scale: float32 scales of ``layout``.
        layout: the weight's scheme; "block" needs a block size with a power-of-two factor >= 16.
        bias: optional ``(N,)`` tensor of any float dtype, added in fp32 inside the fused kernel's epilogue
            (or by cuBLAS's GEMM epilogue on the dequantize route).
        config: force the fused kernel with this tile configuration (tests, tuning).
        route: force ``"fused"`` (the default configuration) or ``"dequant"`` (dequantize + cuBLAS).

    Returns:
        ``(..., N)`` in ``x.dtype``; fp32 accumulation; deterministic for a given route.

    Raises:
        FP8Error: shapes or dtypes the kernels do not take, or an unknown route.
    """
    key = (x.shape, x.dtype, data.shape, data.dtype, layout.granularity, layout.block_size, bias is None, x.device)
    resolved = _route.resolved.get(key) if config is None and route is None else None
    if (
        resolved is not None
        and scale.shape == resolved[1]
        and data.is_contiguous()
        and scale.dtype is torch.float32
        and scale.is_contiguous()
        and scale.device == x.device
        and (bias is None or bias.is_contiguous())
        and (x.dim() == 2 or x.is_contiguous())
    ):
        fused = resolved[0]
        if fused is None:
            return _dequantize_route(x, data, scale, layout, bias)
        return fused_linear(x, data, scale, layout, bias, fused[0], fused[1])
    return _w8a16_linear(key, x, data, scale, layout, bias, config, route)


def measure_route(
    tokens: int, n: int, k: int, dtype: torch.dtype, device: torch.device, layout: FP8Layout, fp8_dtype: torch.dtype,
    bias: bool,
) -> None:
    """Choose the route of a ``(tokens, K) x (N, K)`` call by timing it on inputs made up for the purpose, for a
    tracer whose inputs are fake: the time depends on the sizes, not on the values. The inputs are real tensors
    made outside the tracer's modes and freed on return."""
    from torch.utils._python_dispatch import _disable_current_modes  # noqa: PLC0415

    with _disable_current_modes(), torch.no_grad():
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        # positive finite codes of either FP8 format, one byte each
        codes = torch.randint(0, 120, (n, k), dtype=torch.uint8, device=device).view(fp8_dtype)
        scale = torch.ones(layout.scale_shape((n, k)), dtype=torch.float32, device=device)
        w8a16_linear(x, codes, scale, layout, torch.zeros(n, device=device, dtype=dtype) if bias else None)


def _dequantize_route(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, bias: torch.Tensor | None
) -> torch.Tensor:
    # compute-bound: one pass writing the dense weight (the allocator hands back the block freed by the previous
    # call of this size), then cuBLAS with the bias in its epilogue
    dense = dequantize(data, scale, layout, x.dtype)
    return F.linear(x, dense, bias.to(x.dtype) if bias is not None else None)


def _w8a16_linear(
    key: tuple[object, ...],
    x: torch.Tensor,
    data: torch.Tensor,
    scale: torch.Tensor,
    layout: FP8Layout,
    bias: torch.Tensor | None,
    config: KernelConfig | None,
    route: str | None,
) -> torch.Tensor:
    """The first call of a problem (or a forced one): check, choose the route, remember it."""
    require_triton()
    if data.dim() != 2 or data.dtype not in FP8_DTYPES or x.dtype not in ACT_DTYPES:
        raise FP8Error(
            f"w8a16_linear takes a 2-D float8 weight and bf16/fp16 activations, got a {data.dim()}-D "
            f"{data.dtype} weight and {x.dtype} activations; use fp8ctx.kernels.linear (it falls back to torch)"
        )
    N, K = data.shape
    if x.shape[-1] != K:
        raise FP8Error(f"activations end in {x.shape[-1]} features but the weight is {N}x{K}")
    if route not in (None, "fused", "dequant"):
        raise FP8Error(f"route must be 'fused', 'dequant' or None, got {route!r}")
    lead = x.shape[:-1]
    M = x.numel() // K if K else lead.numel()
    if M == 0 or N == 0 or K == 0:
        y = torch.zeros((*lead, N), dtype=x.dtype, device=x.device)
        if bias is not None and M:
            y += bias.to(y.dtype)
        return y
    if not data.is_contiguous():
        data = data.contiguous()
    scale = check_scale(scale, layout, N, K, x.device)
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    flat = x if x.dim() == 2 or x.is_contiguous() else x.reshape(-1, K)

    def run(name: str) -> torch.Tensor:
        fused = config if name == "fused" and config is not None else _route.config_of(name)
        if fused is None:
            return _dequantize_route(flat, data, scale, layout, bias)
        return fused_linear(flat, data, scale, layout, bias, fused)

    if config is not None or route == "fused":
        chosen = "fused" if config is not None else _route.fused_route(M, N, K)
    elif route == "dequant":
        chosen = "dequant"
    else:
        route_key = _route.key_of(M, N, K, x.dtype, x.device, layout, data.dtype, bias is not None)
        chosen = _route.choose(route_key, M, N, K, x.device, run)
        if not torch.cuda.is_current_stream_capturing() or route_key in _route.routes():
            fused = _route.config_of(chosen)
            plan = plan_for(M, N, K, layout, fused, x.device, bias is not None, data.dtype) if fused else None
            if len(_route.resolved) > 4096:
                _route.resolved.clear()
            _route.resolved[key] = ((fused, plan) if fused else None, layout.scale_shape((N, K)))
    return run(chosen).reshape(*lead, N)

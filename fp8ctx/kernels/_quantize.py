"""Per-token (per-row) FP8 quantization of activations for the FP8 x FP8 path, in Triton and in plain torch.

Both compute the same codes and scales bit for bit: the library's one amax -> scale rule per row
(``_numerics.scale_from_amax``: ``amax / 448``, and 1 where that is 0 — an all-zero token, or one so small that
the division underflows float32, so its values stay finite) and ``q = clamp(x / scale)`` rounded once to e4m3.
"""

from __future__ import annotations

import torch

from .._numerics import scale_from_amax
from ._capability import HAS_TRITON, require_triton, tl, triton
from ._launch import launcher

# FP8 compute rounds activations to e4m3, one scale per token
ACTIVATION_DTYPE = torch.float8_e4m3fn
ACTIVATION_MAX = float(torch.finfo(ACTIVATION_DTYPE).max)

__all__ = ["quantize_rows", "quantize_rows_torch"]


def quantize_rows_torch(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization in plain torch: ``(q (T, K), scale (T, 1) float32)``."""
    # float32: the division below must round only once, at the cast
    values = x2d.float()
    scale = scale_from_amax(values.abs().amax(dim=1, keepdim=True), ACTIVATION_MAX)
    # clamp: e4m3fn has no infinity; an overflow would become NaN
    return (values / scale).clamp(-ACTIVATION_MAX, ACTIVATION_MAX).to(ACTIVATION_DTYPE), scale


if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row: the row is read once for its amax and once (from L1/L2) to quantize it
        row = tl.program_id(0)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        m = tl.max(amax, axis=0)
        # times the reciprocal, as torch does for a tensor divided by a Python number on the GPU; a scale that
        # is 0 (all-zero row, or amax underflowing the division) becomes 1, as _numerics.scale_from_amax says
        scale = m * (1.0 / FP8_MAX)
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(s_ptr + row, scale)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
            # div_rn: Triton's `/` on float32 is approximate, torch's tensor / tensor rounds correctly;
            # clamp: the rounding of v / scale can land a hair above the format's max
            q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


else:  # pragma: no cover - without Triton nothing launches it
    _quantize_rows_kernel = None

_launch = launcher(_quantize_rows_kernel)


def quantize_rows(
    x2d: torch.Tensor, storage_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 quantization in one kernel: ``(q, scale)`` with ``x ~= q * scale``.

    Args:
        x2d: ``(T, K)`` bf16/fp16/fp32 CUDA tensor.
        storage_dtype: the FP8 format of ``q``.

    Returns:
        ``q`` ``(T, K)`` contiguous in ``storage_dtype`` and ``scale`` ``(T, 1)`` float32, equal bit for bit to
        :func:`quantize_rows_torch` for e4m3.
    """
    require_triton()
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    T, K = x2d.shape
    q = torch.empty((T, K), dtype=storage_dtype, device=x2d.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x2d.device)
    if T:
        block = min(4096, triton.next_power_of_2(max(K, 16)))
        consts = dict(FP8_MAX=float(torch.finfo(storage_dtype).max), BLOCK=block)
        # every FP8-compute Linear call comes through here: skip Triton's per-call argument binding
        _launch((T,), x2d.device, (x2d, q, scale, K, x2d.stride(0)), consts, _launch.const_values(consts),
                8 if block >= 2048 else 4, 3)
    return q, scale

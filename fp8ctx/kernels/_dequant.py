"""Dequantize a whole FP8 matrix in one pass, and gather-and-dequantize embedding rows.

The arithmetic is the reference's (fp32 product of the exact FP8 value and its scale, one rounding to the
output dtype), so both are bit-identical to ``_numerics``, NaN and inf codes included. The dequantize kernel
runs at ~90 % of HBM bandwidth; it serves every conv layer and the dequantize + cuBLAS route of the matmul.
"""

from __future__ import annotations

import torch

from .._errors import FP8Error
from .._layout import FP8Layout, Granularity
from ._capability import FP8_DTYPES, HAS_TRITON, require_triton, tl, triton
from ._launch import launcher

__all__ = ["check_scale", "dequantize", "embedding"]

if HAS_TRITON:

    @triton.jit(do_not_specialize=["stride_sn"])
    def _dequant_kernel(q_ptr, s_ptr, o_ptr, R, C, stride_sn,
                        SCALE_MODE: tl.constexpr, SBLOCK: tl.constexpr,
                        FMT_E5M2: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * BR + tl.arange(0, BR)
        offs_c = pid_c * BC + tl.arange(0, BC)
        r_ok = offs_r < R
        mask = r_ok[:, None] & (offs_c[None, :] < C)
        off = offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]
        q = tl.load(q_ptr + off, mask=mask, other=0)
        if FMT_E5M2:
            v = q.to(tl.float8e5, bitcast=True).to(tl.float32)
        else:
            v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # Same arithmetic as the reference: fp32 product, one rounding to out.
        if SCALE_MODE == 0:
            v = v * tl.load(s_ptr)
        elif SCALE_MODE == 1:
            v = v * tl.load(s_ptr + offs_r, mask=r_ok, other=0.0)[:, None]
        else:
            sp = s_ptr + (offs_r // SBLOCK)[:, None] * stride_sn + (offs_c // SBLOCK)[None, :]
            v = v * tl.load(sp, mask=mask, other=0.0)
        tl.store(o_ptr + off, v.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_idx", "stride_sn"])
    def _embedding_kernel(idx_ptr, q_ptr, s_ptr, o_ptr, n_idx, D, stride_sn,
                          SCALE_MODE: tl.constexpr, SBLOCK: tl.constexpr,
                          FMT_E5M2: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        r_ok = rows < n_idx
        idx = tl.load(idx_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        if SCALE_MODE == 0:
            s0 = tl.load(s_ptr)
        elif SCALE_MODE == 1:
            s1 = tl.load(s_ptr + idx, mask=r_ok, other=0.0)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            mask = r_ok[:, None] & (offs_d[None, :] < D)
            q = tl.load(q_ptr + idx[:, None] * D + offs_d[None, :], mask=mask, other=0)
            if FMT_E5M2:
                v = q.to(tl.float8e5, bitcast=True).to(tl.float32)
            else:
                v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if SCALE_MODE == 0:
                v = v * s0
            elif SCALE_MODE == 1:
                v = v * s1[:, None]
            else:
                sp = s_ptr + (idx // SBLOCK)[:, None] * stride_sn + (offs_d // SBLOCK)[None, :]
                v = v * tl.load(sp, mask=mask, other=0.0)
            tl.store(o_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                     v.to(o_ptr.dtype.element_ty), mask=mask)

else:  # pragma: no cover - without Triton nothing launches these
    _dequant_kernel = _embedding_kernel = None

_launch_dequant = launcher(_dequant_kernel)
_launch_embedding = launcher(_embedding_kernel)


def check_scale(scale: torch.Tensor, layout: FP8Layout, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """``scale`` as the kernels read it: float32, contiguous, on ``device``, of the layout's shape.

    Raises:
        FP8Error: the scale's shape is not ``layout.scale_shape((rows, cols))``.
    """
    expected = layout.scale_shape((rows, cols))
    if tuple(scale.shape) != expected:
        raise FP8Error(
            f"a {layout.granularity.value}-scaled {rows}x{cols} FP8 weight needs scales of shape {expected}, got "
            f"{tuple(scale.shape)}; pass the scale tensor stored with the weight"
        )
    if scale.dtype is not torch.float32 or scale.device != device or not scale.is_contiguous():
        scale = scale.to(device=device, dtype=torch.float32).contiguous()
    return scale


def _block_consts(layout: FP8Layout, data: torch.Tensor) -> dict[str, object]:
    block = layout.granularity is Granularity.BLOCK
    return dict(
        SCALE_MODE=layout.granularity.kernel_code,
        SBLOCK=layout.block_size if block else 1,
        FMT_E5M2=data.dtype == torch.float8_e5m2,
    )


def dequantize(
    matrix2d: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Single-pass fp8 -> ``dtype`` with the scale applied.

    Args:
        matrix2d: ``(R, C)`` float8 CUDA tensor, channels first (made contiguous).
        scale: float32 scales of ``layout`` for that matrix.
        layout: the scheme (its channel axis is 0 on the 2-D view).
        dtype: bfloat16, float16 or float32.
        out: an ``(R, C)`` contiguous ``dtype`` tensor to write into (a reused buffer), or None for a new one.

    Returns:
        ``(R, C)``, bit-identical to ``(q.float() * scale_b).to(dtype)`` (NaN codes stay NaN).

    Raises:
        FP8Error: not a 2-D float8 tensor, or scales of the wrong shape.
    """
    require_triton()
    if matrix2d.dim() != 2 or matrix2d.dtype not in FP8_DTYPES:
        raise FP8Error(f"dequantize needs a 2-D float8 matrix, got {matrix2d.dim()}-D {matrix2d.dtype}")
    R, C = matrix2d.shape
    q = matrix2d.contiguous()
    scale = check_scale(scale, layout, R, C, q.device)
    if out is None:
        out = torch.empty((R, C), dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    BR, BC = 16, 256  # 4K elements per program: 16-byte fp8 loads, 2+ waves on big weights
    grid = (-(-R // BR), -(-C // BC))
    consts = dict(_block_consts(layout, q), BR=BR, BC=BC)
    block_stride = scale.stride(0) if layout.granularity is Granularity.BLOCK else 0
    args = (q.view(torch.uint8), scale, out, R, C, block_stride)
    _launch_dequant(grid, q.device, args, consts, _launch_dequant.const_values(consts), 4, 3)
    return out


def embedding(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype
) -> torch.Tensor:
    """Gather rows of an FP8 table and dequantize only those rows.

    Args:
        indices: integer CUDA tensor of any shape, values in ``[0, num_embeddings)`` (not checked on device).
        data: ``(num_embeddings, D)`` float8 table; "channel" scales are per row.
        scale: float32 scales of ``layout``.
        layout: the table's scheme.
        dtype: the output dtype.

    Returns:
        ``indices.shape + (D,)``, equal to ``dequantize(data, ...)[indices]`` bit for bit.
    """
    require_triton()
    E, D = data.shape
    q = data.contiguous()
    scale = check_scale(scale, layout, E, D, q.device)
    idx = indices.reshape(-1)
    if not idx.is_contiguous():
        idx = idx.contiguous()
    n = idx.numel()
    out = torch.empty((n, D), dtype=dtype, device=q.device)
    if n and D:
        ROWS = 4
        BD = min(1024, max(16, triton.next_power_of_2(D)))
        block_stride = scale.stride(0) if layout.granularity is Granularity.BLOCK else 0
        consts = dict(_block_consts(layout, q), ROWS=ROWS, BD=BD)
        args = (idx, q.view(torch.uint8), scale, out, n, D, block_stride)
        _launch_embedding((-(-n // ROWS),), q.device, args, consts, _launch_embedding.const_values(consts), 4, 3)
    return out.reshape(*indices.shape, D)

"""FP8 quantization numerics: pure functions, no autograd, no module state.

Scale convention (the only one in fp8ctx): **a stored value is multiplied by its scale**.

    scale = amax / finfo(storage_dtype).max        (float32, one per group)
    q     = clamp(w / scale, -max, max).to(storage_dtype)
    w'    = (q.to(float32) * scale).to(dtype)

A group whose scale would be 0 (all zeros, or an amax so small that the division underflows) gets scale 1, so
such a weight comes back as exact zeros, never NaN.

Groups are defined on the *channel-first* view of a weight: the output-channel axis moved to the front
(axis 0 for Linear, Conv and Embedding weights, axis 1 for ConvTranspose weights).

- ``"tensor"``: one scale for the whole weight, shape ``()``.
- ``"channel"``: one scale per output channel, shape ``(C,)``.
- ``"block"``: one scale per ``block_size x block_size`` tile of the 2-D view ``(C, K)``, where ``K`` is the
  product of the remaining dims; shape ``(ceil(C / B), ceil(K / B))``. Ragged edge tiles are smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "GRANULARITIES",
    "STORAGE_DTYPES",
    "compute_scale",
    "dequantize",
    "dequantize_rows",
    "quantize",
    "scale_shape",
]

STORAGE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GRANULARITIES = ("tensor", "channel", "block")


def _to_2d(weight: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """The channel-first 2-D view ``(C, K)`` of a weight (a copy only when the axis is not 0)."""
    if weight.dim() == 0:
        return weight.reshape(1, 1)
    if weight.dim() == 1:
        return weight.reshape(-1, 1)
    if channel_axis == 0:
        return weight.reshape(weight.shape[0], -1)
    return rearrange(weight.movedim(channel_axis, 0), "c ... -> c (...)")


def _from_2d(matrix: torch.Tensor, shape: torch.Size, channel_axis: int) -> torch.Tensor:
    """Inverse of :func:`_to_2d`."""
    if len(shape) < 2 or channel_axis == 0:
        return matrix.reshape(shape)
    channel_first = (shape[channel_axis],) + tuple(s for i, s in enumerate(shape) if i != channel_axis)
    return matrix.reshape(channel_first).movedim(0, channel_axis)


def _padded_tiles(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad a ``(C, K)`` matrix to whole tiles and view it as ``(rows, cols, B, B)``."""
    rows, cols = matrix.shape
    pad_rows = -rows % block_size
    pad_cols = -cols % block_size
    if pad_rows or pad_cols:
        # zeros never raise a tile's amax, so padding does not change any scale
        matrix = F.pad(matrix, (0, pad_cols, 0, pad_rows))
    return rearrange(matrix, "(r br) (c bc) -> r c br bc", br=block_size, bc=block_size)


def _untile(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return rearrange(tiles, "r c br bc -> (r br) (c bc)")[:rows, :cols]


def scale_shape(shape: torch.Size, granularity: str, block_size: int, channel_axis: int) -> tuple[int, ...]:
    """The shape of the scale tensor for a weight of ``shape``."""
    if granularity == "tensor":
        return ()
    channels = shape[channel_axis] if len(shape) else 1
    if granularity == "channel":
        return (channels,)
    inner = math.prod(shape) // max(channels, 1)
    return (math.ceil(channels / block_size), math.ceil(inner / block_size))


@torch.no_grad()
def compute_scale(
    weight: torch.Tensor,
    storage_dtype: torch.dtype,
    granularity: str,
    block_size: int = 128,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Float32 scales ``amax / finfo(storage_dtype).max`` for each group of ``weight``.

    Args:
        weight: a floating-point tensor.
        storage_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        granularity: ``"tensor"``, ``"channel"`` or ``"block"``.
        block_size: tile edge for ``"block"``.
        channel_axis: the output-channel axis of ``weight``.

    Returns:
        A float32 tensor of :func:`scale_shape` on ``weight``'s device.

    Example:
        >>> compute_scale(torch.ones(4, 6), torch.float8_e4m3fn, "channel").shape
        torch.Size([4])
    """
    if weight.numel() == 0:  # nothing to scale; amax of an empty group is undefined
        shape = scale_shape(weight.shape, granularity, block_size, channel_axis)
        return torch.ones(shape, dtype=torch.float32, device=weight.device)
    # amax in float32: bf16/fp16 amax is exact, but the division below must not round twice
    magnitude = weight.detach().abs().float()
    if granularity == "tensor":
        amax = magnitude.amax()
    elif granularity == "channel":
        amax = _to_2d(magnitude, channel_axis).amax(dim=1)
    else:
        amax = _padded_tiles(_to_2d(magnitude, channel_axis), block_size).amax(dim=(2, 3))
    scale = amax / torch.finfo(storage_dtype).max
    # a zero scale (an all-zero group, or amax so tiny that amax / max underflows float32) would give 0/0 = NaN
    # on quantize; scale 1 keeps such a group's values, which round to zero in FP8 anyway, finite.
    # NaN/Inf amax stays in the scale, so callers can reject such a weight by checking the (small) scale
    return torch.where(scale == 0, torch.ones_like(scale), scale)


@torch.no_grad()
def quantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    storage_dtype: torch.dtype,
    granularity: str,
    block_size: int = 128,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Divide ``weight`` by its scales, clamp to the FP8 range and cast.

    Returns:
        A tensor of ``storage_dtype`` with ``weight``'s shape (contiguous).

    Example:
        >>> w = torch.randn(8, 16)
        >>> s = compute_scale(w, torch.float8_e4m3fn, "tensor")
        >>> quantize(w, s, torch.float8_e4m3fn, "tensor").dtype
        torch.float8_e4m3fn
    """
    limit = torch.finfo(storage_dtype).max
    # divide in float32 so the cast to FP8 is the only rounding step
    values = weight.detach().float()
    if granularity == "tensor":
        scaled = values / scale
    elif granularity == "channel":
        scaled = _from_2d(_to_2d(values, channel_axis) / scale[:, None], weight.shape, channel_axis)
    else:
        matrix = _to_2d(values, channel_axis)
        tiles = _padded_tiles(matrix, block_size) / scale[:, :, None, None]
        scaled = _from_2d(_untile(tiles, *matrix.shape), weight.shape, channel_axis)
    # w / (amax / max) can round a hair above max; e4m3fn has no inf and would turn that into NaN
    return scaled.clamp(-limit, limit).to(storage_dtype).contiguous()


@torch.no_grad()
def dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block_size: int = 128,
    channel_axis: int = 0,
) -> torch.Tensor:
    """Multiply FP8 ``data`` by its scales in float32 and round once to ``dtype``.

    Example:
        >>> w = torch.randn(8, 16, dtype=torch.bfloat16)
        >>> s = compute_scale(w, torch.float8_e4m3fn, "block", 4)
        >>> q = quantize(w, s, torch.float8_e4m3fn, "block", 4)
        >>> dequantize(q, s, torch.bfloat16, "block", 4).shape
        torch.Size([8, 16])
    """
    # FP8 -> float32 is exact; multiplying in float32 leaves a single rounding to `dtype`
    values = data.float()
    if granularity == "tensor":
        out = values * scale
    elif granularity == "channel":
        out = _from_2d(_to_2d(values, channel_axis) * scale[:, None], data.shape, channel_axis)
    else:
        matrix = _to_2d(values, channel_axis)
        tiles = _padded_tiles(matrix, block_size) * scale[:, :, None, None]
        out = _from_2d(_untile(tiles, *matrix.shape), data.shape, channel_axis)
    return out.to(dtype)


@torch.no_grad()
def dequantize_rows(
    data: torch.Tensor,
    scale: torch.Tensor,
    indices: torch.Tensor,
    dtype: torch.dtype,
    granularity: str,
    block_size: int = 128,
) -> torch.Tensor:
    """Gather rows ``indices`` of a 2-D channel-first FP8 matrix and dequantize only them.

    Used for embedding tables: the cost is that of the looked-up rows, not of the table.

    Returns:
        A tensor of shape ``indices.shape + (data.shape[1],)`` and dtype ``dtype``.
    """
    flat = indices.reshape(-1)
    # FP8 -> float32 is exact; see `dequantize`
    rows = data.index_select(0, flat).float()
    if granularity == "tensor":
        rows = rows * scale
    elif granularity == "channel":
        rows = rows * scale.index_select(0, flat)[:, None]
    else:
        row_scales = scale.index_select(0, torch.div(flat, block_size, rounding_mode="floor"))
        per_column = row_scales.repeat_interleave(block_size, dim=1)[:, : data.shape[1]]
        rows = rows * per_column
    return rows.to(dtype).reshape(*indices.shape, data.shape[1])

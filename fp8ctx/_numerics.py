"""FP8 quantization numerics: pure functions of a weight and its :class:`~fp8ctx._layout.FP8Layout`.

Scale convention (the only one in fp8ctx): **a stored value is multiplied by its scale**.

    scale = amax / finfo(storage_dtype).max        (float32, one per group; see scale_from_amax)
    q     = clamp(w / scale, -max, max).to(storage_dtype)
    w'    = (q.to(float32) * scale).to(dtype)

Groups are tiles of the *channel-first* 2-D view ``(C, K)`` of a weight: the output-channel axis moved to the
front (axis 0 for Linear, Conv and Embedding weights, axis 1 for ConvTranspose weights), the remaining dims
flattened. A ``"tensor"`` tile is the whole view, a ``"channel"`` tile one row, a ``"block"`` tile
``block_size x block_size`` (smaller at the ragged edges). :func:`_tile_edges` is the one place that says so;
every function here works on tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ._layout import FP8Layout, Granularity

__all__ = ["compute_scale", "dequantize", "dequantize_rows", "quantize", "scale_from_amax"]


def scale_from_amax(amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """The scale of a group whose largest magnitude is ``amax``: ``amax / fp8_max``, and 1 where that is 0.

    A zero scale (an all-zero group, or an amax so tiny that the division underflows float32) would turn
    quantization into 0/0 = NaN; scale 1 keeps such a group's values, which round to zero in FP8 anyway, finite.
    NaN/Inf amax stays in the scale, so callers can reject such a weight by checking the (small) scale.

    Args:
        amax: float32 magnitudes, any shape.
        fp8_max: the largest finite value of the target FP8 format (a Python float: on CUDA, torch divides by
            a Python number as a multiplication by its reciprocal, and the Triton quantizer does the same).

    Returns:
        Float32 scales shaped like ``amax``.

    Example:
        >>> scale_from_amax(torch.tensor([448.0, 0.0, float("inf")]), 448.0)
        tensor([1., 1., inf])
    """
    scale = amax / fp8_max
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# -- the channel-first view and its tiles ----------------------------------------------------------------


def _one_row(layout: FP8Layout, ndim: int) -> bool:
    # "tensor" is one tile per matrix, where the order of elements is irrelevant (no copy to move an axis); a
    # weight without the channel axis (0-d, or 1-D with axis 1) is one channel
    return layout.granularity is Granularity.TENSOR or ndim <= layout.channel_axis


def _view_3d(weight: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """The channel-first view ``(B, C, K)`` of a weight: its ``B`` matrices (1 without batch dims), each
    ``(C, K)`` (a copy only when the channel axis is not the first past the batch dims)."""
    batch = math.prod(layout.batch_shape(weight.shape))
    if _one_row(layout, weight.dim()):
        return weight.reshape(batch, 1, weight.numel() // max(batch, 1))
    # sizes spelled out (no -1): a weight with zero channels or zero inputs still has its view
    moved = weight.movedim(layout.channel_axis, layout.batch_dims)
    return moved.reshape(batch, *layout.matrix_shape(weight.shape))


def _from_view_3d(matrices: torch.Tensor, shape: torch.Size, layout: FP8Layout) -> torch.Tensor:
    """Inverse of :func:`_view_3d`."""
    axis, first = layout.channel_axis, layout.batch_dims
    if _one_row(layout, len(shape)) or axis == first:
        return matrices.reshape(shape)
    channel_first = (*shape[:first], shape[axis], *(size for i, size in enumerate(shape) if i >= first and i != axis))
    return matrices.reshape(channel_first).movedim(first, axis)


def _tile_edges(layout: FP8Layout, rows: int, cols: int) -> tuple[int, int]:
    """The ``(rows, cols)`` of one scale's tile on a non-empty ``(rows, cols)`` view: the granularity switch.

    A block never exceeds the view, so a weight smaller than ``block_size`` is one tile of its own size,
    not a ``block_size x block_size`` tile mostly made of padding.
    """
    if layout.granularity is Granularity.TENSOR:
        return rows, cols
    if layout.granularity is Granularity.CHANNEL:
        return 1, cols
    return min(layout.block_size, rows), min(layout.block_size, cols)


def _tiles(matrices: torch.Tensor, edges: tuple[int, int]) -> torch.Tensor:
    """``(B, rows, cols)`` as ``(B, tile_rows, tile_cols, edge_rows, edge_cols)``, zero-padded to whole tiles.

    The padding is less than one tile edge per dim and no larger than the matrix (edges never exceed it);
    zeros never raise a tile's amax, so padding changes no scale.
    """
    rows, cols = matrices.shape[1:]
    pad_rows, pad_cols = -rows % edges[0], -cols % edges[1]
    if pad_rows or pad_cols:
        matrices = F.pad(matrices, (0, pad_cols, 0, pad_rows))
    return rearrange(matrices, "n (r br) (c bc) -> n r c br bc", br=edges[0], bc=edges[1])


def _scaled(matrices: torch.Tensor, scale: torch.Tensor, edges: tuple[int, int], divide: bool) -> torch.Tensor:
    """``(B, rows, cols)`` divided (quantize) or multiplied (dequantize) by one scale per tile of ``edges``.

    ``scale`` holds one value per tile, matrix by matrix in tile order (any shape with that many elements).
    """
    tiles = _tiles(matrices, edges)
    per_tile = scale.reshape(*tiles.shape[:3], 1, 1)
    scaled = tiles / per_tile if divide else tiles * per_tile
    return rearrange(scaled, "n r c br bc -> n (r br) (c bc)")[:, : matrices.shape[1], : matrices.shape[2]]


def _rescaled(values: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, divide: bool) -> torch.Tensor:
    """Float32 ``values`` of a weight's shape, divided or multiplied by the scale of each one's group."""
    if values.numel() == 0:  # no groups to scale
        return values
    matrices = _view_3d(values, layout)
    scaled = _scaled(matrices, scale, _tile_edges(layout, *matrices.shape[1:]), divide)
    return _from_view_3d(scaled, values.shape, layout)


# -- the public functions --------------------------------------------------------------------------------


@torch.no_grad()
def compute_scale(weight: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """Float32 scales ``amax / finfo(storage_dtype).max`` for each group of ``weight`` (see :func:`scale_from_amax`).

    Args:
        weight: a floating-point tensor.
        layout: how the scales are grouped and the FP8 format they scale into.

    Returns:
        A float32 tensor of ``layout.scale_shape(weight.shape)`` on ``weight``'s device.

    Example:
        >>> compute_scale(torch.ones(4, 6), FP8Layout("channel")).shape
        torch.Size([4])
    """
    shape = layout.scale_shape(weight.shape)
    if weight.numel() == 0:  # nothing to scale; amax of an empty group is undefined
        return torch.ones(shape, dtype=torch.float32, device=weight.device)
    matrices = _view_3d(weight.detach(), layout)
    tiles = _tiles(matrices, _tile_edges(layout, *matrices.shape[1:]))
    # max |w| per tile without a |w| copy of the weight (with it and an out-of-place clamp in quantize, torch 2.6
    # held 1270 MiB of host memory after quantizing forty 2048x2048 float32 weights in turn, 234 MiB without:
    # 160 MiB of it the codes); exact in any dtype, then float32 so that the division does not round twice
    amax = torch.linalg.vector_norm(tiles, ord=math.inf, dim=(3, 4)).float()
    return scale_from_amax(amax, layout.fp8_max).reshape(shape)


@torch.no_grad()
def quantize(weight: torch.Tensor, scale: torch.Tensor, layout: FP8Layout) -> torch.Tensor:
    """Divide ``weight`` by its scales, clamp to the FP8 range and cast.

    Args:
        weight: a floating-point tensor.
        scale: its scales, as :func:`compute_scale` gives them.
        layout: the layout ``scale`` was computed for.

    Returns:
        A tensor of ``layout.storage_dtype`` with ``weight``'s shape (contiguous).

    Example:
        >>> w, layout = torch.randn(8, 16), FP8Layout("tensor")
        >>> quantize(w, compute_scale(w, layout), layout).dtype
        torch.float8_e4m3fn
    """
    # divide in float32 so the cast to FP8 is the only rounding step
    scaled = _rescaled(weight.detach().float(), scale, layout, divide=True)
    # w / (amax / max) can round a hair above max; e4m3fn has no inf and would turn that into NaN
    limit = layout.fp8_max
    # in place: ``scaled`` is the division's own result (one weight-sized temporary, not two)
    clamped = scaled.clamp_(-limit, limit) if scaled.numel() else scaled
    return clamped.to(layout.storage_dtype).contiguous()


@torch.no_grad()
def dequantize(data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype) -> torch.Tensor:
    """Multiply FP8 ``data`` by its scales in float32 and round once to ``dtype``.

    Args:
        data: FP8 codes, the weight's shape.
        scale: float32 scales of ``layout.scale_shape(data.shape)``.
        layout: the layout the codes were quantized with.
        dtype: the dtype of the result.

    Returns:
        A tensor of ``data``'s shape in ``dtype``.

    Example:
        >>> w, layout = torch.randn(8, 16, dtype=torch.bfloat16), FP8Layout("block", block_size=4)
        >>> s = compute_scale(w, layout)
        >>> dequantize(quantize(w, s, layout), s, layout, torch.bfloat16).shape
        torch.Size([8, 16])
    """
    # FP8 -> float32 is exact; multiplying in float32 leaves a single rounding to `dtype`. Contiguous like the
    # weight it stands for: scales on axis 1 (ConvTranspose) come back permuted, and views (reshape) of a held
    # weight are taken on this result
    return _rescaled(data.float(), scale, layout, divide=False).to(dtype, memory_format=torch.contiguous_format)


@torch.no_grad()
def dequantize_rows(
    data: torch.Tensor, scale: torch.Tensor, indices: torch.Tensor, layout: FP8Layout, dtype: torch.dtype
) -> torch.Tensor:
    """Gather rows ``indices`` of a 2-D channel-first FP8 matrix and dequantize only them.

    Used for embedding tables: the cost is that of the looked-up rows, not of the table.

    Args:
        data: FP8 codes ``(rows, D)``; ``layout.channel_axis`` is 0.
        scale: its float32 scales.
        indices: integer row indices, any shape.
        layout: the layout the codes were quantized with.
        dtype: the dtype of the result.

    Returns:
        A tensor of shape ``indices.shape + (D,)`` and dtype ``dtype``.
    """
    flat = indices.reshape(-1)
    # gather first: an index outside the table raises here, as it does in F.embedding
    picked = data.index_select(0, flat)
    rows, cols = data.shape
    if picked.numel() == 0:
        return picked.to(dtype).reshape(*indices.shape, cols)
    edges = _tile_edges(layout, rows, cols)
    # the table's scales as a (tile rows, tile cols) grid; each looked-up row takes its tile row of it
    grid = scale.reshape(-(-rows // edges[0]), -(-cols // edges[1]))
    row_scales = grid.index_select(0, torch.div(flat, edges[0], rounding_mode="floor"))
    # FP8 -> float32 is exact; see `dequantize`
    out = _scaled(picked.float().unsqueeze(0), row_scales, (1, edges[1]), divide=False)
    return out.to(dtype).reshape(*indices.shape, cols)

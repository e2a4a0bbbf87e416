"""The kernels as registered torch ops (``torch.ops.fp8ctx.*``), so tracers see one opaque op per call.

``torch.compile``, ``torch.export`` and ``make_fx`` record ``fp8ctx::linear`` and its siblings in the graph
(shapes come from the fake implementations below) and run the same eager implementation at run time: the
Triton kernels on a GPU, pure torch elsewhere, captured by CUDA graphs like any other launch. The layout
travels as plain integers (the op schema has no place for an object) and is rebuilt from a cache.

Going through the dispatcher costs host time (measured in bench/mechanism.py: ~11 µs per call on a CPU of this
workplace), so the dispatch point calls the implementations directly in eager mode and the ops only when a
tracer is running.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._layout import FP8Layout, Granularity
from . import _impl

__all__ = ["layout_args", "ops"]

_BY_CODE = {granularity.kernel_code: granularity for granularity in Granularity}


@functools.lru_cache(maxsize=256)
def _layout(code: int, block_size: int, channel_axis: int, storage_dtype: torch.dtype) -> FP8Layout:
    return FP8Layout(_BY_CODE[code], block_size, channel_axis, storage_dtype)


def layout_args(layout: FP8Layout) -> tuple[int, int, int]:
    """The layout as op arguments (the storage dtype is the codes' own dtype)."""
    return layout.granularity.kernel_code, layout.block_size, layout.channel_axis


def _setup_linear(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, data, scale, granularity, block_size, dtype, bias = inputs
    ctx.save_for_backward(data, scale)
    ctx.layout = _layout(granularity, block_size, 0, data.dtype)
    ctx.dtype, ctx.has_bias = dtype, bias is not None


def _linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    # the weight is frozen (FP8 codes have no gradient); x gets the weight-only gradient, also for the FP8-compute
    # op (its activation rounding is treated as the identity, as eager mode does when autograd records)
    data, scale = ctx.saved_tensors
    dense = _impl.dequantize(data, scale, ctx.layout, ctx.dtype)
    grad_x = grad @ dense.to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, grad_bias


def _linear_op(name: str) -> Any:
    """``fp8ctx::<name>`` for the linear implementation ``_impl.<name>`` (looked up at call time)."""

    @torch.library.custom_op(f"fp8ctx::{name}", mutates_args=())
    def op(
        x: torch.Tensor,
        data: torch.Tensor,
        scale: torch.Tensor,
        granularity: int,
        block_size: int,
        dtype: torch.dtype,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return getattr(_impl, name)(x, data, scale, _layout(granularity, block_size, 0, data.dtype), dtype, bias)

    @op.register_fake
    def _(x: torch.Tensor, data: torch.Tensor, *layout_dtype_bias: Any) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], data.shape[0]))

    op.register_autograd(_linear_backward, setup_context=_setup_linear)
    return op


_linear = _linear_op("linear")
_fp8_linear = _linear_op("fp8_linear")


@torch.library.custom_op("fp8ctx::dequantize", mutates_args=())
def _dequantize(
    data: torch.Tensor, scale: torch.Tensor, granularity: int, block_size: int, channel_axis: int, dtype: torch.dtype
) -> torch.Tensor:
    return _impl.dequantize(data, scale, _layout(granularity, block_size, channel_axis, data.dtype), dtype)


@_dequantize.register_fake
def _dequantize_fake(
    data: torch.Tensor, scale: torch.Tensor, granularity: int, block_size: int, channel_axis: int, dtype: torch.dtype
) -> torch.Tensor:
    return data.new_empty(data.shape, dtype=dtype)


@torch.library.custom_op("fp8ctx::embedding", mutates_args=())
def _embedding(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, granularity: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    return _impl.embedding(indices, data, scale, _layout(granularity, block_size, 0, data.dtype), dtype)


@_embedding.register_fake
def _embedding_fake(
    indices: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, granularity: int, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    return data.new_empty((*indices.shape, data.shape[1]), dtype=dtype)


ops = torch.ops.fp8ctx

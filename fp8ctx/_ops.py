"""Dedicated paths for the layers fp8ctx targets: Linear, Conv*, ConvTranspose*, Embedding.

Memory bound: inside a forward, at most one weight's dense copy exists at a time. A handler dequantizes
its weight (or not at all, on the fused GPU path), runs the op, and drops the copy before returning.
When autograd records the op (an input requires grad), the dense copy is not kept for backward: a
saved-tensor hook stores the FP8 weight instead and dequantizes it again when backward needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import kernels
from ._errors import FP8Error
from ._tensor import FP8Tensor, implements

__all__: list[str] = []


def _records_grad(*tensors: Any) -> bool:
    """Whether autograd will save this op's inputs (and so our hook must keep the dense copy out)."""
    if torch.compiler.is_compiling():
        # under torch.compile, AOTAutograd decides what backward saves; fake tensors have no storage to match
        return False
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


@dataclasses.dataclass(frozen=True)
class _DenseView:
    """A saved view of a dense weight copy, to be rebuilt from FP8 in backward."""

    weight: FP8Tensor
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def rebuild(self) -> torch.Tensor:
        return self.weight.dequantize().as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def _saved_as_fp8(weight: FP8Tensor, dense: torch.Tensor) -> Iterator[None]:
    """While active, autograd saves views of ``dense`` as references to ``weight`` instead."""
    # match by storage address, and hold no reference to `dense` itself: autograd keeps these hooks alive
    try:
        address, dtype, device = dense.untyped_storage().data_ptr(), dense.dtype, dense.device
    except RuntimeError:
        # a tracer's fake tensor has no storage (torch.compile before 2.12 runs handlers on them while
        # is_compiling() is False); the compiler decides what backward saves anyway
        yield
        return

    def pack(saved: torch.Tensor) -> Any:
        if (
            type(saved) is torch.Tensor
            and saved.dtype == dtype
            and saved.device == device
            and saved.untyped_storage().data_ptr() == address
        ):
            return _DenseView(weight, saved.size(), saved.stride(), saved.storage_offset())
        return saved

    def unpack(packed: Any) -> torch.Tensor:
        return packed.rebuild() if isinstance(packed, _DenseView) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _passthrough(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``func`` as torch would; FP8 arguments are dequantized by ``__torch_dispatch__``."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _with_dense_weight(func: Callable[..., Any], input: Any, weight: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    """Dequantize ``weight`` once, run ``func`` on it, let the copy go when the call returns."""
    dense = weight.dequantize()
    if _records_grad(input, *args, *kwargs.values()):
        with _saved_as_fp8(weight, dense):
            return func(input, dense, *args, **kwargs)
    return func(input, dense, *args, **kwargs)


@implements(F.linear)
def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    if not isinstance(weight, FP8Tensor) or isinstance(input, FP8Tensor) or isinstance(bias, FP8Tensor):
        return _passthrough(F.linear, (input, weight, bias), {})
    if weight.value_dtype != weight.compute_dtype or _records_grad(input, bias):
        return _with_dense_weight(F.linear, input, weight, bias)
    layout = weight.fp8_layout
    run = kernels.fp8_linear if weight.compute == "fp8" else kernels.linear
    return run(input, weight.qdata, weight.scale, weight.compute_dtype, layout.granularity, layout.block_size, bias)


def _convolution(func: Callable[..., Any]) -> Callable[..., Any]:
    def handler(input: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(weight, FP8Tensor) or isinstance(input, FP8Tensor):
            return _passthrough(func, (input, weight, *args), kwargs)
        return _with_dense_weight(func, input, weight, *args, **kwargs)

    return handler


for _conv in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    implements(_conv)(_convolution(_conv))


@implements(F.embedding)
def _embedding(
    input: Any,
    weight: Any,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    if not isinstance(weight, FP8Tensor) or isinstance(input, FP8Tensor):
        args = (input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        return _passthrough(F.embedding, args, {})
    if max_norm is not None:
        raise FP8Error(
            f"embedding {weight.param_name!r} has max_norm={max_norm}, which renormalizes the table in place; an "
            "FP8-held table is read-only. Leave this layer out with exclude=."
        )
    if weight.value_dtype != weight.compute_dtype:
        return F.embedding(input, weight.dequantize())
    layout = weight.fp8_layout
    # padding_idx and scale_grad_by_freq only shape the weight's gradient, which FP8 weights never get
    return kernels.embedding(
        input, weight.qdata, weight.scale, weight.compute_dtype, layout.granularity, layout.block_size
    )



# NumPy arrays and Python lists cannot hold an FP8Tensor lazily: they get the dense values
@implements(torch.Tensor.numpy)
def _numpy(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self.dequantize().numpy(*args, **kwargs)


@implements(torch.Tensor.tolist)
def _tolist(self: Any) -> Any:
    return self.dequantize().tolist()

"""Dedicated paths for the layers fp8ctx targets: Linear, Conv*, ConvTranspose*, Embedding.

Each handler is registered in :data:`FUNCTIONS` for the torch functions it replaces, with the argument that
holds the weight; ``FP8Tensor.__torch_function__`` runs it when that argument is the call's only FP8 weight
(otherwise the call runs as torch would, on dequantized values). Layering: this module knows FP8 weights only
through their public attributes, so ``_tensor`` imports it, not the other way round.

Memory bound: inside a forward, at most one weight's dense copy exists at a time. A handler dequantizes
its weight (or not at all, on the fused GPU path), runs the op, and drops the copy before returning.
When autograd records the op (an input requires grad), the dense copy is not kept for backward: a
saved-tensor hook stores the FP8 weight instead and dequantizes it again when backward needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from . import kernels
from ._errors import FP8Error

if TYPE_CHECKING:
    from ._tensor import FP8Tensor

__all__ = ["FUNCTIONS", "Handler", "implements"]


@dataclasses.dataclass(frozen=True)
class Handler:
    """A dedicated path for one torch function, taken when its weight argument is the call's only FP8 weight."""

    run: Callable[..., Any]
    weight_at: int  # the weight's position ...
    weight_keyword: str  # ... or keyword in the torch function's signature

    def applies(self, fp8_type: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether ``run`` takes this call: the weight is an ``fp8_type`` and no other argument is one."""
        position = self.weight_at
        weight = args[position] if len(args) > position else kwargs.get(self.weight_keyword)
        if not isinstance(weight, fp8_type):
            return False
        return sum(isinstance(value, fp8_type) for value in (*args, *kwargs.values())) == 1


# torch function -> its dedicated FP8 path
FUNCTIONS: dict[Callable[..., Any], Handler] = {}


def implements(
    *functions: Callable[..., Any], weight_at: int = 1, weight_keyword: str = "weight"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler that runs instead of each of ``functions`` when its weight argument is FP8."""

    def register(run: Callable[..., Any]) -> Callable[..., Any]:
        for function in functions:
            FUNCTIONS[function] = Handler(run, weight_at, weight_keyword)
        return run

    return register


def _records_grad(*tensors: Any) -> bool:
    """Whether autograd will save this op's inputs (and so our hook must keep the dense copy out)."""
    # cheapest first: inference (no_grad / inference_mode) answers with one C call on every layer call
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # under torch.compile, AOTAutograd decides what backward saves; fake tensors have no storage to match
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


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


def _with_dense_weight(func: Callable[..., Any], input: Any, weight: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    """Dequantize ``weight`` once, run ``func`` on it, let the copy go when the call returns."""
    dense = weight.dequantize()
    if _records_grad(input, *args, *kwargs.values()):
        with _saved_as_fp8(weight, dense):
            return func(input, dense, *args, **kwargs)
    return func(input, dense, *args, **kwargs)


@implements(F.linear)
def _linear(input: torch.Tensor, weight: FP8Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.value_dtype != weight.compute_dtype or _records_grad(input, bias):
        return _with_dense_weight(F.linear, input, weight, bias)
    run = kernels.fp8_linear if weight.compute == "fp8" else kernels.linear
    return run(input, weight.qdata, weight.scale, weight.fp8_layout, weight.compute_dtype, bias)


def _convolution(func: Callable[..., Any]) -> Callable[..., Any]:
    def handler(input: torch.Tensor, weight: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
        return _with_dense_weight(func, input, weight, *args, **kwargs)

    return handler


for _conv in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    implements(_conv)(_convolution(_conv))


@implements(F.embedding)
def _embedding(
    input: torch.Tensor,
    weight: FP8Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    if max_norm is not None:
        raise FP8Error(
            f"embedding {weight.param_name!r} has max_norm={max_norm}, which renormalizes the table in place; an "
            "FP8-held table is read-only. Leave this layer out with exclude=."
        )
    if weight.value_dtype != weight.compute_dtype:
        return F.embedding(input, weight.dequantize())
    # padding_idx and scale_grad_by_freq only shape the weight's gradient, which FP8 weights never get
    return kernels.embedding(input, weight.qdata, weight.scale, weight.fp8_layout, weight.compute_dtype)


# NumPy arrays and Python lists cannot hold an FP8Tensor lazily: they get the dense values
@implements(torch.Tensor.numpy, weight_at=0, weight_keyword="self")
def _numpy(self: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    return self.dequantize().numpy(*args, **kwargs)


@implements(torch.Tensor.tolist, weight_at=0, weight_keyword="self")
def _tolist(self: FP8Tensor) -> Any:
    return self.dequantize().tolist()

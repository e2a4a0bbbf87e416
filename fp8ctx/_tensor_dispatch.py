"""What a torch function or an aten op does when an :class:`~fp8ctx.FP8Tensor` is among its arguments.

``FP8Tensor.__torch_function__`` and ``__torch_dispatch__`` hand their calls here. A torch function with an FP8
path (``_ops``' table: Linear, Conv, Embedding...) runs it; any other is refused if it writes (``_readonly``) and
otherwise runs on the plain tensor. Below autograd, an alias stays FP8, ``.to(device / float dtype)`` moves the codes,
and every other op sees the dequantized weight, its views read-only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from ._layout import COMPUTE_DTYPES
from ._ops import FUNCTIONS, LIBRARY_OPERATORS, operator_handler
from ._readonly import read_only, refuse_python_writes, refuse_writes

if TYPE_CHECKING:
    from ._tensor import FP8Tensor

__all__ = ["torch_dispatch", "torch_function"]

_aten = torch.ops.aten

# ops that only re-wrap the same storage; they must return an FP8Tensor, not a dense copy
_ALIASES = {_aten.detach.default, _aten.alias.default}


def torch_function(fp8_type: type[FP8Tensor], func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` at the torch-function level: its FP8 path when ``_ops`` has one that takes these
    arguments, else the plain call (writes refused), whose results are never re-wrapped as ``fp8_type``."""
    handler = FUNCTIONS.get(func)
    if handler is None and isinstance(func, LIBRARY_OPERATORS):
        handler = operator_handler(func)
    if handler is not None and handler.applies(fp8_type, args, kwargs):
        out = handler.run(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out._is_view() and not out.requires_grad and torch.is_grad_enabled():
            # the kernels compute under no_grad, and autograd refuses to record in-place ops on a view made
            # there (`embeddings += position_embeddings` with grad enabled); a detached alias has no such
            # history, and shares the values
            out = out.detach()
        return out
    refuse_python_writes(func, args, kwargs)
    # unlike torch.Tensor's default, results are never re-wrapped as FP8Tensor
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def torch_dispatch(fp8_type: type[FP8Tensor], func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` at the aten level: an alias or whole view stays FP8, a move keeps FP8 storage,
    a write raises, anything else runs on the dequantized weights."""
    if func in _ALIASES or _whole_view(func, args, kwargs):
        return args[0]._rewrap()
    if func is _aten._to_copy.default:
        moved = _moved(args[0], **kwargs)
        if moved is not None:
            return moved
    refuse_writes(func, args, kwargs)
    source = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, fp8_type))
    args, kwargs = tree_map_only(fp8_type, fp8_type.dequantize, (args, kwargs))
    out = func(*args, **kwargs)
    if func.is_view:
        # views of the temporary dense copy (one, or a list from split/unbind/chunk): writes through
        # them would be lost, so they must raise
        out = tree_map_only(torch.Tensor, lambda view: read_only(view, source.param_name), out)
    return out


def _whole_view(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``torch.as_strided(w, w.shape, w.stride(), 0)``: a view of all of ``w`` (FSDP2 makes its unsharded
    parameter this way), which must stay FP8."""
    if func is not _aten.as_strided.default:
        return False
    weight, size, stride = args[:3]
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset")
    return tuple(size) == tuple(weight.shape) and tuple(stride) == weight.stride() and offset in (None, 0)


def _moved(source: FP8Tensor, dtype: torch.dtype | None = None, device: Any = None, **options: Any) -> FP8Tensor | None:
    """``.to(device)`` / ``.to(float_dtype)`` keep FP8 storage: the FP8 codes move, the compute dtype changes.

    That is what ``module.to(...)``, ``.cuda()``, ``.half()`` and accelerate's offload hooks need inside the
    block: each layer's weight stays FP8 on its layer's device instead of becoming a dense copy. Conversions
    to any other dtype (integers, FP8 formats) return dense values instead (``None`` here).
    """
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        return None
    non_blocking = bool(options.get("non_blocking", False))
    data, scale = source._data, source._scale
    if device is not None:
        data, scale = data.to(device, non_blocking=non_blocking), scale.to(device, non_blocking=non_blocking)
    memory_format = options.get("memory_format")
    if memory_format not in (None, torch.preserve_format):
        # module.to(memory_format=torch.channels_last): the codes take the layout; the originals follow on exit
        data = data.contiguous(memory_format=memory_format)
    return source._rewrap(data, scale) if dtype is None else source._rewrap(data, scale, compute_dtype=dtype)


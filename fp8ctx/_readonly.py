"""The write-refusal policy: a weight held as FP8 is read-only, and so is every dense view of it.

A write into an ``FP8Tensor`` could only land in a temporary dequantized copy and be lost silently; a write
through a view of that copy likewise. Both raise an :class:`~fp8ctx.FP8Error` naming the weight instead.
Writes are recognised at two levels: Python-level calls (in-place methods and operators, ``out=``,
``weight.data = t``) in ``__torch_function__``, and aten ops whose schema marks an argument as written in
``__torch_dispatch__`` (what ``torch.no_grad()`` and ``nn.init`` reach).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from ._errors import FP8Error

__all__ = [
    "ReadOnlyTensor",
    "ReadOnlyView",
    "read_only",
    "read_only_array",
    "refuse_export",
    "refuse_python_writes",
    "refuse_writes",
]


class ReadOnlyTensor(torch.Tensor):
    """A tensor that stands for a weight held as FP8 (named ``param_name``): reads work, writes raise."""

    param_name: str


class ReadOnlyView(ReadOnlyTensor):
    """A dense view (``w.T``, ``w[0]``, ``w.view(-1)``) of an FP8-held weight: reads work, writes raise.

    Example:
        >>> view = read_only(torch.zeros(2), "fc.weight")
        >>> view.add_(1)
        Traceback (most recent call last):
        fp8ctx._errors.FP8Error: add_ would write into weight 'fc.weight', which is held as FP8 inside ...
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        refuse_python_writes(func, args, kwargs)
        if func is torch.Tensor.__dlpack__ and isinstance(args[0], ReadOnlyView):
            raise refuse_export("DLPack export (torch.from_dlpack / np.from_dlpack)", args[0].param_name)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _ARRAY_EXPORTS and not kwargs.get("copy"):  # NumPy arrays over the temporary copy
            return read_only_array(out)
        source = next((a for a in args if isinstance(a, ReadOnlyView)), None)
        if source is None:
            return out
        # a view of a view (w.T[0], w.view(-1).view(2, -1)) is just as read-only
        return tree_map_only(
            torch.Tensor, lambda t: read_only(t, source.param_name) if _shares_storage(t, source) else t, out
        )


def read_only(view: torch.Tensor, weight_name: str) -> ReadOnlyView:
    """``view`` marked as a read-only view of the held weight ``weight_name`` (no copy)."""
    marked = view.as_subclass(ReadOnlyView)
    marked.param_name = weight_name
    return marked


def read_only_array(array: Any) -> Any:
    """``array`` (a NumPy array of a held weight's values) made read-only: a write could only reach a temporary
    copy, so it raises (NumPy's ``ValueError: assignment destination is read-only``) instead of being lost."""
    array.flags.writeable = False
    return array


def refuse_export(what: str, weight: str) -> FP8Error:
    """The error for a protocol that would hand out writable memory of a held weight (DLPack)."""
    return FP8Error(
        f"{what} of weight {weight!r}: it is held as FP8 inside fp8_weights(), so a consumer's writes could only "
        "reach a temporary dequantized copy. Export a dense copy (weight.dequantize()), or do this outside the block."
    )


_ARRAY_EXPORTS = {torch.Tensor.numpy, torch.Tensor.__array__}


def _shares_storage(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    try:
        return tensor.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, fake) hold no values to protect
        return False


# in-place Python operators; other in-place methods end in a single underscore
_INPLACE_OPERATORS = {
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
}
_HARMLESS_INPLACE = {"requires_grad_", "retain_grad", "share_memory_"}


def refuse_python_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if ``func`` writes into a :class:`ReadOnlyTensor` (seen at the ``__torch_function__`` level).

    Raises:
        FP8Error: the call writes in place, through ``out=`` or by ``.data =`` into a held weight or a view of one.
    """
    name = getattr(func, "__name__", "")
    in_place = name in _INPLACE_OPERATORS or (
        name.endswith("_") and not name.endswith("__") and name not in _HARMLESS_INPLACE
    )
    out = kwargs.get("out")
    if name == "__set__" and getattr(func, "__self__", None) is torch.Tensor.data:
        in_place = True  # `weight.data = t` would replace the held weight's values behind the context's back
    if not in_place and out is None:  # reads (property getters included) are the common case: no flattening
        return
    targets = [args[0]] if in_place and args else []
    if out is not None:
        targets += tree_leaves(out)
    for target in targets:
        if isinstance(target, ReadOnlyTensor):
            raise _write_error(name or func, target.param_name)


def refuse_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if the aten op ``func`` would write into a :class:`ReadOnlyTensor` (seen in ``__torch_dispatch__``).

    Raises:
        FP8Error: the op's schema marks an argument that is a held weight as written.
    """
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if isinstance(value, ReadOnlyTensor):
            raise _write_error(func, value.param_name)


def _write_error(operation: Any, weight: str) -> FP8Error:
    return FP8Error(
        f"{operation} would write into weight {weight!r}, which is held as FP8 inside fp8_weights(); a write could "
        "only reach a temporary dequantized copy. Modify the weight outside the block, leave this layer out with "
        "exclude=, or write into a dense copy (weight.dequantize() or weight.clone())."
    )

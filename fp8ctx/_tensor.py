"""`FP8Tensor`: an FP8 weight that presents itself as the dense weight it replaces.

An ``FP8Tensor`` holds FP8 data plus float32 scales (see ``_numerics`` for the convention) and reports the
original weight's dtype, shape and device. Layers that fp8ctx knows (Linear, Conv*, ConvTranspose*,
Embedding) reach it through ``__torch_function__`` and run a dedicated path; every other read of it
(``w.float()``, ``w @ x``, ``w.T``...) falls through to ``__torch_dispatch__``, which dequantizes it first, so
no caller ever sees raw FP8 codes. Writes into it raise: an FP8 weight is read-only while held.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

from . import kernels
from ._errors import FP8Error

__all__ = ["FP8Layout", "FP8Tensor", "implements"]

_aten = torch.ops.aten

# torch functions with a dedicated FP8 path, filled by `implements` (see `_ops`)
_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {}

# ops that only re-wrap the same storage; they must return an FP8Tensor, not a dense copy
_ALIASES = {_aten.detach.default, _aten.alias.default}


def implements(*functions: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler that runs instead of ``function`` when an ``FP8Tensor`` is among its arguments."""

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        for function in functions:
            _FUNCTIONS[function] = handler
        return handler

    return register


@dataclasses.dataclass(frozen=True)
class FP8Layout:
    """Where a weight's scales apply: granularity, block edge and output-channel axis."""

    granularity: str
    block_size: int
    channel_axis: int


class FP8Tensor(torch.Tensor):
    """An FP8 weight (data + float32 scale) that reports the original dtype, shape and device.

    Args:
        data: FP8 codes, the original weight's shape.
        scale: float32 scales, shaped as ``_numerics.scale_shape`` says.
        layout: granularity, block size and channel axis the scales refer to.
        dtype: the original (compute) dtype; :meth:`dequantize` returns it.
        name: the parameter name, used in error messages.
        value_dtype: the dtype values are rounded to when dequantized (default ``dtype``). It differs from
            ``dtype`` only after a conversion such as ``module.float()`` inside the block, which then gives
            exactly what converting the dequantized ``value_dtype`` weight would give.
        compute: ``"weight_only"`` (activations stay in ``dtype``) or ``"fp8"`` (Linear layers also round
            activations to FP8 per token and multiply in FP8; see ``kernels.fp8_linear``).

    Example:
        >>> store = fp8ctx.FP8Store.from_module(torch.nn.Linear(16, 8))
        >>> w = store["weight"]
        >>> w.shape, w.dtype, w.storage_dtype, w.dequantize().dtype
        (torch.Size([8, 16]), torch.float32, torch.float8_e4m3fn, torch.float32)
    """

    _data: torch.Tensor
    _scale: torch.Tensor
    compute_dtype: torch.dtype
    fp8_layout: FP8Layout
    param_name: str
    value_dtype: torch.dtype
    compute: str

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor,
        scale: torch.Tensor,
        layout: FP8Layout,
        dtype: torch.dtype,
        name: str = "",
        value_dtype: torch.dtype | None = None,
        compute: str = "weight_only",
    ) -> FP8Tensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), dtype=dtype, device=data.device, requires_grad=False
        )

    def __init__(
        self,
        data: torch.Tensor,
        scale: torch.Tensor,
        layout: FP8Layout,
        dtype: torch.dtype,
        name: str = "",
        value_dtype: torch.dtype | None = None,
        compute: str = "weight_only",
    ) -> None:
        self._data = data
        self._scale = scale
        # the reported dtype as a plain attribute: reading `self.dtype` goes through __torch_function__
        self.compute_dtype = dtype
        self.fp8_layout = layout
        self.param_name = name
        self.value_dtype = value_dtype or dtype
        self.compute = compute

    # -- what users read -------------------------------------------------------------------------------

    @property
    def qdata(self) -> torch.Tensor:
        """The FP8 codes (a plain tensor of ``storage_dtype``)."""
        return self._data

    @property
    def scale(self) -> torch.Tensor:
        """The float32 scales; ``dequantize()`` multiplies by them."""
        return self._scale

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._data.dtype

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes actually held: FP8 codes plus scales."""
        return self._data.numel() * self._data.element_size() + self._scale.numel() * self._scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """A dense copy in ``dtype`` (default: the original dtype): the values every layer computes with."""
        layout = self.fp8_layout
        dense = kernels.dequantize(
            self._data, self._scale, self.value_dtype, layout.granularity, layout.block_size, layout.channel_axis
        )
        wanted = dtype or self.compute_dtype
        return dense if wanted == self.value_dtype else dense.to(wanted)

    def to_device(self, device: torch.device | str) -> FP8Tensor:
        """The same FP8 weight with data and scales on ``device`` (no dequantization)."""
        return _as_parameter(self._rewrap(self._data.to(device), self._scale.to(device)))

    def with_compute(self, compute: str) -> FP8Tensor:
        """The same FP8 weight (shared codes and scales) computing in ``compute`` mode."""
        return _as_parameter(self._rewrap(compute=compute))

    def _rewrap(
        self,
        data: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        compute: str | None = None,
    ) -> FP8Tensor:
        return FP8Tensor(
            self._data if data is None else data,
            self._scale if scale is None else scale,
            self.fp8_layout,
            dtype or self.compute_dtype,
            self.param_name,
            self.value_dtype,
            compute or self.compute,
        )

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"FP8Tensor(name={self.param_name!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"storage_dtype={self.storage_dtype}, granularity={self.fp8_layout.granularity!r}, device={self.device}"
            + (f", compute={self.compute!r})" if self.compute != "weight_only" else ")")
        )

    # -- torch.compile support: the two inner tensors are the real state ------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["_data", "_scale"], (self.fp8_layout, self.dtype, self.param_name, self.value_dtype, self.compute)

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], context: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> FP8Tensor:
        return FP8Tensor(inner["_data"], inner["_scale"], *context)

    def _stable_hash_for_caching(self) -> str:
        # torch.compile's AOT cache key: the structure only; values are graph inputs, the name is cosmetic
        return f"FP8Tensor{tuple(self.shape)}{self.dtype}{self.value_dtype}{self.storage_dtype}{tuple(self._scale.shape)}{self.fp8_layout}{self.compute}"

    # -- interception ----------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # hot path: every layer call and every `.dtype`/`.shape` read of a held weight lands here
        kwargs = kwargs or {}
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        _refuse_python_writes(func, args, kwargs)
        # unlike torch.Tensor's default, results are never re-wrapped as FP8Tensor
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _ALIASES:
            return args[0]._rewrap()
        if func is _aten._to_copy.default:
            moved = _moved(args[0], **kwargs)
            if moved is not None:
                return moved
        _refuse_writes(func, args, kwargs)
        source = next(t for t in _flat(args, kwargs) if isinstance(t, FP8Tensor))
        args, kwargs = tree_map_only(FP8Tensor, FP8Tensor.dequantize, (args, kwargs))
        out = func(*args, **kwargs)
        if func.is_view:
            # views of the temporary dense copy (one, or a list from split/unbind/chunk): writes through
            # them would be lost, so they must raise
            out = tree_map_only(torch.Tensor, lambda view: _read_only(view, source.param_name), out)
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> FP8Tensor:
        # copy.deepcopy(model) inside the block: the copy holds its own FP8 codes and scales
        copied = _as_parameter(self._rewrap(copy.deepcopy(self._data, memo), copy.deepcopy(self._scale, memo)))
        memo[id(self)] = copied
        return copied


class ReadOnlyView(torch.Tensor):
    """A dense view (``w.T``, ``w[0]``, ``w.view(-1)``) of an FP8-held weight: reads work, writes raise."""

    fp8_source: str

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        _refuse_python_writes(func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        source = next((a for a in args if isinstance(a, ReadOnlyView)), None)
        if source is None:
            return out
        # a view of a view (w.T[0], w.view(-1).view(2, -1)) is just as read-only
        return tree_map_only(
            torch.Tensor, lambda t: _read_only(t, source.fp8_source) if _shares_storage(t, source) else t, out
        )


def _read_only(view: torch.Tensor, weight_name: str) -> ReadOnlyView:
    marked = view.as_subclass(ReadOnlyView)
    marked.fp8_source = weight_name
    return marked


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


def _refuse_python_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if ``func`` writes into an FP8Tensor or a view of one (seen at the ``__torch_function__`` level)."""
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
        targets += _flat((), out)
    for target in targets:
        if isinstance(target, (FP8Tensor, ReadOnlyView)):
            weight = target.param_name if isinstance(target, FP8Tensor) else target.fp8_source
            raise _write_error(name or func, weight)


def _write_error(operation: Any, weight: str) -> FP8Error:
    return FP8Error(
        f"{operation} would write into weight {weight!r}, which is held as FP8 inside fp8_weights(); a write could "
        "only reach a temporary dequantized copy. Modify the weight outside the block, leave this layer out with "
        "exclude=, or write into a dense copy (weight.dequantize() or weight.clone())."
    )


def _flat(args: Any, kwargs: Any) -> list[Any]:
    from torch.utils._pytree import tree_leaves

    return tree_leaves((args, kwargs))


def _moved(source: FP8Tensor, dtype: torch.dtype | None = None, device: Any = None, **options: Any) -> FP8Tensor | None:
    """``.to(device)`` / ``.to(float_dtype)`` keep FP8 storage: the FP8 codes move, the compute dtype changes.

    That is what ``module.to(...)``, ``.cuda()``, ``.half()`` and accelerate's offload hooks need inside the
    block: each layer's weight stays FP8 on its layer's device instead of becoming a dense copy. Conversions
    to non-float dtypes return dense values instead (``None`` here).
    """
    if dtype is not None and (not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
        return None
    non_blocking = bool(options.get("non_blocking", False))
    data, scale = source._data, source._scale
    if device is not None:
        data, scale = data.to(device, non_blocking=non_blocking), scale.to(device, non_blocking=non_blocking)
    memory_format = options.get("memory_format")
    if memory_format not in (None, torch.preserve_format):
        # module.to(memory_format=torch.channels_last): the codes take the layout; the originals follow on exit
        data = data.contiguous(memory_format=memory_format)
    return source._rewrap(data, scale, dtype)


def _refuse_writes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise if ``func`` would write into an FP8Tensor: the write would land in a temporary copy."""
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if isinstance(value, FP8Tensor):
            raise _write_error(func, value.param_name)


def _as_parameter(tensor: FP8Tensor) -> FP8Tensor:
    """Mark ``tensor`` as an ``nn.Parameter`` (torch's route for tensor subclasses) without grad."""
    return torch.nn.Parameter(tensor, requires_grad=False)  # type: ignore[return-value]


def make_fp8_tensor(
    data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: torch.dtype, name: str
) -> FP8Tensor:
    """Build the parameter-flagged FP8Tensor that the store holds and the context swaps in."""
    return _as_parameter(FP8Tensor(data, scale, layout, dtype, name))

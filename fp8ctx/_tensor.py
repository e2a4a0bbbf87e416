"""`FP8Tensor`: an FP8 weight that presents itself as the dense weight it replaces.

An ``FP8Tensor`` holds FP8 data plus float32 scales (see ``_numerics`` for the convention) and reports the
original weight's dtype, shape and device. What torch functions and aten ops do with it is ``_tensor_dispatch``'s
job (layers fp8ctx knows run their FP8 path; every other read sees the dequantized weight, so no caller ever sees
raw FP8 codes; writes raise); importing the tensor registers those paths and ``_protocols``' handlers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from . import _numerics, _protocols, kernels  # noqa: F401  (_protocols registers its handlers)
from ._devices import check_device
from ._errors import FP8Error
from ._layout import COMPUTE_DTYPES, FP8Layout, Granularity
from ._readonly import ReadOnlyTensor
from ._tensor_checks import dtype_names, mismatch, non_finite_weight
from ._tensor_dispatch import torch_dispatch, torch_function

__all__ = ["FP8Meta", "FP8Tensor"]

# the tensors an FP8Tensor wraps (torch.compile traces through them)
_INNER = ("_data", "_scale")


@dataclasses.dataclass(frozen=True)
class FP8Meta:
    """Everything an :class:`FP8Tensor` is besides its codes and scales, declared once.

    An ``FP8Tensor`` reads each field as an attribute of its own (``w.fp8_layout``, ``w.param_name``...);
    its copies, torch.compile's flatten context and cache key, and its repr are all built from this record.

    Args:
        fp8_layout: the scheme the codes and scales are stored in (storage dtype included).
        compute_dtype: the original weight's dtype: the one the tensor reports and :meth:`FP8Tensor.dequantize`
            returns.
        param_name: the parameter name, for error messages. Not compared: it changes no computation, so
            weights that differ only in name share compiled graphs.
        value_dtype: the dtype values are rounded to when dequantized (default ``compute_dtype``). It differs
            only after a conversion such as ``module.float()`` inside the block, which then gives exactly what
            converting the dequantized ``value_dtype`` weight would give.
        compute: ``"weight_only"`` (activations stay in ``compute_dtype``) or ``"fp8"`` (Linear layers also round
            activations to FP8 per token and multiply in FP8; see ``kernels.fp8_linear``).
    """

    fp8_layout: FP8Layout
    compute_dtype: torch.dtype
    param_name: str = dataclasses.field(default="", compare=False)
    value_dtype: torch.dtype = None  # type: ignore[assignment]  # None: compute_dtype
    compute: str = "weight_only"

    def __post_init__(self) -> None:
        if self.value_dtype is None:
            object.__setattr__(self, "value_dtype", self.compute_dtype)


class FP8Tensor(ReadOnlyTensor):
    """An FP8 weight (codes + float32 scales) that reports the original dtype, shape and device.

    Build one with :meth:`from_dense` (quantizes a weight) or :meth:`from_fp8` (wraps codes and scales
    made elsewhere, checked). Besides :attr:`qdata`, :attr:`scale` and :attr:`storage_dtype`, it has the
    fields of :class:`FP8Meta` as read-only attributes: ``fp8_layout``, ``compute_dtype``, ``param_name``,
    ``value_dtype`` and ``compute``.

    Example:
        >>> w = FP8Tensor.from_dense(torch.randn(8, 16), FP8Layout("channel"), name="fc.weight")
        >>> w.shape, w.dtype, w.storage_dtype, w.scale.shape, w.dequantize().dtype
        (torch.Size([8, 16]), torch.float32, torch.float8_e4m3fn, torch.Size([8]), torch.float32)
    """

    _data: torch.Tensor
    _scale: torch.Tensor
    _meta: FP8Meta

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, meta: FP8Meta) -> FP8Tensor:
        # codes and scales as they are: the public constructors below are the ones that check
        self = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), dtype=meta.compute_dtype, device=data.device, requires_grad=False
        )
        self._data, self._scale, self._meta = data, scale, meta
        return self

    # -- building one ----------------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, weight: torch.Tensor, layout: FP8Layout, *, name: str = "") -> FP8Tensor:
        """Quantize ``weight`` into a new FP8 weight; ``weight`` itself is only read.

        Args:
            weight: a tensor of one of ``COMPUTE_DTYPES`` (float16, bfloat16, float32, float64); its dtype
                becomes the compute dtype.
            layout: the scheme to store it in (its ``channel_axis`` must be the weight's output-channel axis).
            name: the parameter name, for error messages.

        Returns:
            The FP8Tensor, flagged as an ``nn.Parameter`` without grad: what a store holds and the context
            swaps in.

        Raises:
            FP8Error: ``weight`` is of another dtype, or holds NaN or Inf (names ``name``).
        """
        weight = weight.detach()
        if weight.dtype not in COMPUTE_DTYPES:
            raise FP8Error(
                f"weight {name!r} must be a tensor of one of {dtype_names(COMPUTE_DTYPES)}, got {weight.dtype}"
            )
        scale = _numerics.compute_scale(weight, layout)
        if not bool(torch.isfinite(scale).all()):  # the scale holds the amax, and it is small to check
            raise FP8Error(non_finite_weight(name))
        data = _numerics.quantize(weight, scale, layout)
        return _as_parameter(cls(data, scale, FP8Meta(layout, weight.dtype, name)))

    @classmethod
    def from_fp8(
        cls,
        data: torch.Tensor,
        scale: torch.Tensor,
        layout: FP8Layout,
        dtype: torch.dtype,
        *,
        name: str = "",
        value_dtype: torch.dtype | None = None,
    ) -> FP8Tensor:
        """Wrap FP8 codes and scales quantized elsewhere (e.g. read from a file), after checking they fit.

        Args:
            data: FP8 codes of ``layout.storage_dtype``, the weight's shape.
            scale: positive, finite float32 scales of ``layout.scale_shape(data.shape)``, on ``data``'s device.
            layout: the scheme they were stored in.
            dtype: the original weight's dtype (one of ``COMPUTE_DTYPES``).
            name: the parameter name, for error messages.
            value_dtype: the dtype values are rounded to when dequantized (see :class:`FP8Meta`); default
                ``dtype``.

        Returns:
            The FP8Tensor, flagged as an ``nn.Parameter`` without grad.

        Raises:
            FP8Error: any of the above does not hold (names ``name``, what was expected and what came).
        """
        problem = mismatch(data, scale, layout, dtype, value_dtype)
        if problem:
            raise FP8Error(f"weight {name!r}: {problem}")
        return _as_parameter(cls(data, scale, FP8Meta(layout, dtype, name, value_dtype)))

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
        """The FP8 format of the codes (the layout's)."""
        return self._meta.fp8_layout.storage_dtype

    @property
    def nbytes(self) -> int:  # type: ignore[override]
        """Bytes actually held: FP8 codes plus scales."""
        return self._data.numel() * self._data.element_size() + self._scale.numel() * self._scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # type: ignore[override]
        """A dense copy in ``dtype`` (default: the original dtype): the values every layer computes with."""
        meta = self._meta
        dense = kernels.dequantize(self._data, self._scale, meta.fp8_layout, meta.value_dtype)
        wanted = dtype or meta.compute_dtype
        return dense if wanted == meta.value_dtype else dense.to(wanted)

    def matrix(self, index: int | torch.Tensor) -> FP8Tensor:
        """Matrix ``index`` of a batched weight (an expert of a mixture-of-experts tensor), still FP8.

        The codes and scales are views of this weight's (nothing is copied or dequantized).

        Args:
            index: an int or a 0-d integer tensor, into the first batch dim.

        Raises:
            FP8Error: the weight has no batch dims (its layout's ``batch_dims`` is 0).

        Example:
            >>> experts = FP8Tensor.from_dense(torch.randn(4, 6, 8), FP8Layout("channel", channel_axis=1, batch_dims=1))
            >>> expert = experts.matrix(2)
            >>> expert.shape, expert.scale.shape, torch.equal(expert.dequantize(), experts.dequantize()[2])
            (torch.Size([6, 8]), torch.Size([6]), True)
        """
        layout = self._meta.fp8_layout
        if not layout.batch_dims:
            raise FP8Error(f"weight {self.param_name!r} is one matrix (batch_dims=0): there is no matrix to pick")
        return self._rewrap(self._data[index], self._scale[index], fp8_layout=layout.matrix())

    def transposed(self) -> FP8Tensor:
        """The weight with its last two dims swapped (each matrix transposed), still FP8.

        Each scale keeps its group (the layout's channel axis moves with the dims); the codes are a view.

        Raises:
            FP8Error: the weight has more dims than its batch dims and one matrix (a conv kernel, say).

        Example:
            >>> w = FP8Tensor.from_dense(torch.randn(6, 8), FP8Layout("block", block_size=4))
            >>> torch.equal(w.transposed().dequantize(), w.dequantize().T), w.transposed().fp8_layout.channel_axis
            (True, 1)
        """
        layout, ndim = self._meta.fp8_layout, self._data.dim()
        if ndim != layout.batch_dims + 2:
            raise FP8Error(
                f"weight {self.param_name!r} ({ndim}-d, batch_dims={layout.batch_dims}) is not a stack of matrices; "
                "only those transpose without dequantizing"
            )
        last = {ndim - 1: ndim - 2, ndim - 2: ndim - 1}
        axis = last.get(layout.channel_axis, layout.channel_axis)
        return self._rewrap(self._data.transpose(-2, -1), fp8_layout=layout.replace(channel_axis=axis))

    def to_device(self, device: torch.device | str) -> FP8Tensor:
        """The same FP8 weight with data and scales on ``device`` (no dequantization).

        Raises:
            FP8Error: ``device`` is not a cpu or cuda device of this machine.
        """
        device = check_device(device)
        return _as_parameter(self._rewrap(self._data.to(device), self._scale.to(device)))

    def with_compute(self, compute: str) -> FP8Tensor:
        """The same FP8 weight (shared codes and scales) computing in ``compute`` mode."""
        return _as_parameter(self._rewrap(compute=compute))

    def _rewrap(self, data: torch.Tensor | None = None, scale: torch.Tensor | None = None, **changes: Any) -> FP8Tensor:
        """A new wrapper over other (or the same) tensors, with some :class:`FP8Meta` fields changed."""
        meta = dataclasses.replace(self._meta, **changes) if changes else self._meta
        return type(self)(self._data if data is None else data, self._scale if scale is None else scale, meta)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        meta = ", ".join(f"{field.name}={getattr(self._meta, field.name)!r}" for field in dataclasses.fields(FP8Meta))
        return f"FP8Tensor(shape={tuple(self.shape)}, device={self.device}, {meta})"

    # -- torch.compile support: the two inner tensors are the real state ------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], FP8Meta]:
        # Besides torch.compile, this is what keeps a stand-in's identity through `module.to()` / `.half()`
        # inside the block: for a tensor subclass that flattens, nn.Module._apply swaps the converted contents
        # into the same Parameter object (torch.utils.swap_tensors); otherwise it would set `param.data`, a
        # write into the held weight that is refused.
        return list(_INNER), self._meta

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], meta: FP8Meta, outer_size: Any, outer_stride: Any
    ) -> FP8Tensor:
        return FP8Tensor(*(inner[name] for name in _INNER), meta)

    def _stable_hash_for_caching(self) -> str:
        # torch.compile's AOT cache key: the structure only (values are graph inputs): the shapes and the
        # meta's compared fields
        key = tuple(getattr(self._meta, field.name) for field in dataclasses.fields(FP8Meta) if field.compare)
        return f"FP8Tensor{tuple(self.shape)}{tuple(self._scale.shape)}{key}"

    # -- interception ----------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # hot path: every layer call and every `.dtype`/`.shape` read of a held weight lands here
        return torch_function(FP8Tensor, func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return torch_dispatch(FP8Tensor, func, args, kwargs or {})

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # pickle.dumps / torch.save (a held weight, a state_dict() taken inside the block, a store): the FP8
        # weight itself; torch.load(weights_only=True) accepts it (see the allowlist below). The codes travel as
        # bytes: torch's plain pickling of float8 storages cannot be loaded back
        return _rebuild, (self._data.view(torch.uint8), self._scale, self._meta)

    def __deepcopy__(self, memo: dict[int, Any]) -> FP8Tensor:
        # copy.deepcopy(model) inside the block: the copy holds its own FP8 codes and scales
        copied = _as_parameter(self._rewrap(copy.deepcopy(self._data, memo), copy.deepcopy(self._scale, memo)))
        memo[id(self)] = copied
        return copied


def _rebuild(data: torch.Tensor, scale: torch.Tensor, meta: FP8Meta) -> FP8Tensor:
    """An unpickled FP8 weight, checked like any codes and scales that come from outside."""
    layout = meta.fp8_layout
    codes = data.view(layout.storage_dtype) if isinstance(data, torch.Tensor) and data.dtype == torch.uint8 else data
    weight = FP8Tensor.from_fp8(codes, scale, layout, meta.compute_dtype, name=meta.param_name, value_dtype=meta.value_dtype)
    return weight if meta.compute == "weight_only" else weight.with_compute(meta.compute)


def _as_parameter(tensor: FP8Tensor) -> FP8Tensor:
    """Mark ``tensor`` as an ``nn.Parameter`` (torch's route for tensor subclasses) without grad."""
    return torch.nn.Parameter(tensor, requires_grad=False)  # type: ignore[return-value]


# FP8Meta's fields, read as the tensor's own attributes (w.fp8_layout, w.param_name...), without a second list
def _meta_attribute(name: str) -> property:
    return property(lambda self: getattr(self._meta, name), doc=f"The :class:`FP8Meta` field ``{name}``.")


for _field in dataclasses.fields(FP8Meta):
    setattr(FP8Tensor, _field.name, _meta_attribute(_field.name))


# torch.load(weights_only=True), the default since torch 2.6, unpickles only allowlisted globals
torch.serialization.add_safe_globals([_rebuild, FP8Meta, FP8Layout, Granularity])

"""What every tensor protocol gives for a weight held as FP8: dense values that stay valid, or a clear refusal.

An ``FP8Tensor`` has no dense storage of its own, so anything that reaches for storage would read freed or
foreign memory (``np.from_dlpack`` did), crash (``torch.from_dlpack``, ``share_memory()`` did) or lose writes
(``weight.numpy()`` gave a writable copy). The rule here, for each protocol:

- NumPy (``numpy()``, ``np.asarray`` through ``__array__``) and ``tolist()``: the dequantized values; arrays
  are read-only, since a write could only reach a temporary copy (``np.array(weight)`` copies: writable).
- DLPack (``__dlpack__``: ``torch.from_dlpack``, ``np.from_dlpack``): refused, as a consumer may write through
  it; ``weight.dequantize()`` is the dense copy to export.
- storage access (``untyped_storage()``, ``storage()``): refused, there is no dense storage (torch's own
  machinery, which only records the wrapper's empty storage, still gets it). ``data_ptr()`` is the FP8 codes'
  address: libraries ask it for alignment and identity.
- sharing (``share_memory_()``, ``is_shared()``): applied to the FP8 codes and scales (``model.share_memory()``
  inside the block works; on exit the original weight is shared too).
- pickling and ``torch.save`` (``FP8Tensor.__reduce_ex__``): the FP8 weight itself, codes, scales and scheme.
- ``requires_grad_()``: recorded (``requested_grad``) and given to the original weight on exit.

Views of a held weight (``ReadOnlyView``) follow the same NumPy and DLPack rules (see ``_readonly``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from ._errors import FP8Error
from ._ops import implements
from ._readonly import read_only_array, refuse_export

if TYPE_CHECKING:
    from ._tensor import FP8Tensor

__all__: list[str] = []


@implements(torch.Tensor.numpy, weight_at=0, weight_keyword="self")
def _numpy(self: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    return read_only_array(self.dequantize().numpy(*args, **kwargs))


@implements(torch.Tensor.__array__, weight_at=0, weight_keyword="self")
def _array(self: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    array = torch.Tensor.__array__(self.dequantize(), *args, **kwargs)
    return array if kwargs.get("copy") is True else read_only_array(array)


@implements(torch.Tensor.tolist, weight_at=0, weight_keyword="self")
def _tolist(self: FP8Tensor) -> Any:
    return self.dequantize().tolist()


@implements(torch.Tensor.__dlpack__, weight_at=0, weight_keyword="self")
def _dlpack(self: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
    raise refuse_export("DLPack export (torch.from_dlpack / np.from_dlpack)", self.param_name)


def _no_storage(method: Any) -> Any:
    what = f"{method.__name__}()"

    def refuse(self: FP8Tensor, *args: Any, **kwargs: Any) -> Any:
        if _called_by_torch():
            # torch's own machinery (torch.compile describing its inputs) reads the wrapper's storage record,
            # which holds no data; it gets it as for any tensor subclass
            with torch._C.DisableTorchFunctionSubclass():
                return method(self, *args, **kwargs)
        raise FP8Error(
            f"{what} of weight {self.param_name!r}: it is held as FP8 inside fp8_weights() and has no dense storage. "
            "Use weight.dequantize() for a dense copy, weight.qdata / weight.scale for the FP8 data, or do this "
            "outside the block."
        )

    return refuse


# frames between a caller and the handler: fp8ctx's own, torch's dispatch to __torch_function__, and the Python
# bodies of Tensor methods (Tensor.storage) that hand the call on
_PASSING = ("fp8ctx.", "torch.overrides", "torch._tensor")


def _caller_module() -> str:
    """The module of the nearest caller, past the frames that only pass the call on."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_PASSING):
        frame = frame.f_back
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def _called_by_torch() -> bool:
    """Whether the nearest caller, past the frames that only pass the call on, is torch's own code."""
    return _caller_module().split(".")[0] == "torch"


for _method in (torch.Tensor.untyped_storage, torch.Tensor.storage):
    implements(_method, weight_at=0, weight_keyword="self")(_no_storage(_method))


@implements(torch.Tensor.data_ptr, weight_at=0, weight_keyword="self")
def _data_ptr(self: FP8Tensor) -> int:
    # an address, not values: libraries ask it for alignment and identity (transformers' grouped_mm check);
    # the FP8 codes' address answers both truthfully and points at memory that exists
    return self.qdata.data_ptr()


@implements(torch.Tensor.share_memory_, weight_at=0, weight_keyword="self")
def _share_memory(self: FP8Tensor) -> FP8Tensor:
    self.qdata.share_memory_()
    self.scale.share_memory_()
    return self


@implements(torch.Tensor.is_shared, weight_at=0, weight_keyword="self")
def _is_shared(self: FP8Tensor) -> bool:
    return self.qdata.is_shared()


@implements(torch.Tensor.requires_grad_, weight_at=0, weight_keyword="self")
def _requires_grad(self: FP8Tensor, requires_grad: bool = True) -> FP8Tensor:
    # a held weight gets no gradient inside the block; the request (model.requires_grad_(False) to freeze it)
    # is kept for the original, which takes it on exit like every weight that was not held
    # nn.Parameter(weight) calls it too (wrapping a stand-in, or module.to() inside the block re-wrapping one):
    # that is the wrapper's own flag, not a request
    if _caller_module() != "torch.nn.parameter":
        self.requested_grad = bool(requires_grad)
    return self

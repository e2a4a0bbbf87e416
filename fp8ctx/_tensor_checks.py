"""What an FP8Tensor's inputs must satisfy: codes and scales made elsewhere (a file, a pickle), a weight to quantize."""

from __future__ import annotations

import torch

from ._layout import COMPUTE_DTYPES, FP8Layout

__all__ = ["dtype_names", "mismatch", "non_finite_weight"]


def mismatch(
    data: torch.Tensor, scale: torch.Tensor, layout: FP8Layout, dtype: object, value_dtype: object = None
) -> str:
    """What does not fit in codes and scales said to be stored as ``layout`` for a weight of ``dtype`` (rounded to
    ``value_dtype`` when dequantized, if given): empty when all fits."""
    if not isinstance(data, torch.Tensor) or data.dtype != layout.storage_dtype:
        return f"codes must be a {layout.storage_dtype} tensor, got {getattr(data, 'dtype', type(data).__name__)}"
    if data.dim() and layout.channel_axis >= data.dim():
        return f"channel_axis {layout.channel_axis} is not an axis of a {data.dim()}-d weight"
    if layout.batch_dims >= max(data.dim(), 1):
        return f"batch_dims {layout.batch_dims} leaves no matrix in a {data.dim()}-d weight"
    want = layout.scale_shape(data.shape)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != want:
        got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        return f"scales must be float32 of shape {want} for {layout} and codes {tuple(data.shape)}, got {got}"
    if scale.device != data.device:
        return f"scales are on {scale.device} but codes on {data.device}; load both onto one device"
    bad = int((~((scale > 0) & torch.isfinite(scale))).sum())
    if bad:
        return f"scales must be positive and finite, as quantizing makes them; {bad} of {scale.numel()} are not (damaged data)"
    if dtype not in COMPUTE_DTYPES:
        return f"the original dtype must be one of {dtype_names(COMPUTE_DTYPES)}, got {dtype!r}"
    bad = _non_finite_codes(data)
    if bad:
        return f"codes must be finite, as quantizing makes them; {bad} of {data.numel()} are NaN or Inf (damaged data)"
    if value_dtype is not None and value_dtype not in COMPUTE_DTYPES:
        return f"the value dtype must be one of {dtype_names(COMPUTE_DTYPES)}, got {value_dtype!r}"
    return ""


def non_finite_weight(name: str) -> str:
    """Why the weight ``name`` (holding NaN or Inf) cannot be quantized, and how to leave its layer out."""
    layer = name.rpartition(".")[0]
    way_out = f"exclude=[{layer!r}]" if layer else "exclude="
    return (
        f"weight {name!r} contains NaN or Inf; FP8 cannot represent it. Fix the weight, or leave its layer "
        f"out with {way_out}"
    )


# the exponent (and, for e4m3fn, mantissa) bits that mark NaN/Inf codes: quantizing clamps, so it never writes them
_NON_FINITE_BITS = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


_CODE_CHUNK = 1 << 20  # codes checked at a time: the check's own memory stays a few MiB whatever the weight


def _non_finite_codes(data: torch.Tensor) -> int:
    """How many FP8 codes are NaN or Inf, read from their bits (no float copy of the codes)."""
    mask = _NON_FINITE_BITS[data.dtype]
    bits = data.reshape(-1).view(torch.uint8)
    return sum(int(((chunk & mask) == mask).sum()) for chunk in bits.split(_CODE_CHUNK))


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``dtypes`` for a message: "float16, bfloat16"."""
    return ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


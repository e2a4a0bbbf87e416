"""Quantization options, validated once at the API boundary."""

from __future__ import annotations

import dataclasses

import torch

from ._errors import FP8Error
from ._numerics import GRANULARITIES, STORAGE_DTYPES

__all__ = ["FP8Config"]


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """How weights are stored: FP8 format, scale granularity and block size.

    Args:
        storage_dtype: ``torch.float8_e4m3fn`` (default; 3 mantissa bits, range ±448) or
            ``torch.float8_e5m2`` (2 mantissa bits, range ±57344).
        granularity: ``"tensor"`` (one scale per weight), ``"channel"`` (one per output channel) or
            ``"block"`` (one per ``block_size x block_size`` tile of the (out, in·kernel) view).
        block_size: tile edge for ``"block"``; a positive int.

    Raises:
        FP8Error: an option outside the values above (names the option and the value).

    Example:
        >>> FP8Config(granularity="block", block_size=64).granularity
        'block'
    """

    storage_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: str = "tensor"
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise FP8Error(
                f"storage_dtype must be one of {_names(STORAGE_DTYPES)}, got {self.storage_dtype!r}"
            )
        if self.granularity not in GRANULARITIES:
            raise FP8Error(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise FP8Error(f"block_size must be a positive int, got {self.block_size!r}")


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d) for d in dtypes)

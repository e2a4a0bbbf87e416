"""The quantization scheme of one FP8 weight, as a single typed object.

Every numerics and kernel function takes an :class:`FP8Layout` whole: the storage format, how scales are
grouped (the one place that spells the three granularities), the block edge and the output-channel axis.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence

import torch

from ._errors import FP8Error

__all__ = ["COMPUTE_DTYPES", "FP8Layout", "Granularity", "STORAGE_DTYPES", "parse_storage_dtype"]

STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)

# the dense formats an FP8 weight can stand in for: its compute dtype is one of these (torch's other 8-bit
# float formats count as floating point too, but nothing computes in them)
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# the short spellings the CLI and file metadata use, beside torch's own names
_STORAGE_NAMES = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def parse_storage_dtype(value: object, option: str = "storage_dtype") -> torch.dtype:
    """``torch.float8_e4m3fn`` / ``torch.float8_e5m2``, or one of their names (``"e4m3"``, ``"float8_e5m2"``).

    Raises:
        FP8Error: anything else (names ``option`` and the accepted values).
    """
    if isinstance(value, torch.dtype) and value in STORAGE_DTYPES:
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _STORAGE_NAMES:
        return _STORAGE_NAMES[value.removeprefix("torch.")]
    raise FP8Error(
        f"{option} must be torch.float8_e4m3fn or torch.float8_e5m2 (or 'e4m3' / 'e5m2'), got {value!r}"
    )


def storage_name(dtype: torch.dtype) -> str:
    """The short name of a storage dtype (``"e4m3"`` or ``"e5m2"``), as files and the CLI spell it."""
    return "e4m3" if dtype == torch.float8_e4m3fn else "e5m2"


class Granularity(str, enum.Enum):
    """How a weight's scales are grouped (on its channel-first 2-D view ``(C, K)``)."""

    TENSOR = "tensor"  # one scale, shape ()
    CHANNEL = "channel"  # one per output channel, shape (C,)
    BLOCK = "block"  # one per block_size x block_size tile, shape (ceil(C/B), ceil(K/B))

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # as it is spelled when passed in: FP8Layout(granularity='block', ...)
        return repr(self.value)

    @classmethod
    def parse(cls, value: object) -> Granularity:
        try:
            return cls(value)
        except ValueError:
            raise FP8Error(
                f"granularity must be one of {[g.value for g in cls]}, got {value!r}"
            ) from None

    @property
    def kernel_code(self) -> int:
        """The integer the Triton kernels branch on (a ``tl.constexpr``)."""
        return _KERNEL_CODES[self]


_KERNEL_CODES = {Granularity.TENSOR: 0, Granularity.CHANNEL: 1, Granularity.BLOCK: 2}


@dataclasses.dataclass(frozen=True)
class FP8Layout:
    """The scheme one FP8 weight is stored in.

    Args:
        granularity: a :class:`Granularity` or its name (``"tensor"``, ``"channel"``, ``"block"``).
        block_size: tile edge for ``"block"`` (a positive int; ignored otherwise).
        channel_axis: the output-channel axis of the weight (0 for Linear/Conv/Embedding, 1 for
            ConvTranspose weights, 1 or 2 for mixture-of-experts tensors), counted over the whole shape.
        storage_dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        batch_dims: how many leading dims index separate matrices, each with scales of its own (1 for a
            mixture-of-experts tensor ``(experts, out, in)``: one scale group set per expert; 0 otherwise).
            ``channel_axis`` is then at least ``batch_dims``.

    Raises:
        FP8Error: a field outside those values (names the field).

    Example:
        >>> layout = FP8Layout("block", block_size=64)
        >>> layout
        FP8Layout(granularity='block', block_size=64, channel_axis=0, storage_dtype=torch.float8_e4m3fn, batch_dims=0)
        >>> layout.granularity is Granularity.BLOCK, layout.scale_shape((200, 100))
        (True, (4, 2))
        >>> FP8Layout("channel", channel_axis=1, batch_dims=1).scale_shape((8, 200, 100))  # 8 experts
        (8, 200)
    """

    granularity: Granularity = Granularity.TENSOR
    block_size: int = 128
    channel_axis: int = 0
    storage_dtype: torch.dtype = torch.float8_e4m3fn
    batch_dims: int = 0

    def __post_init__(self) -> None:
        # frozen: normalise spelled-out values in place, once, at construction
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        object.__setattr__(self, "storage_dtype", parse_storage_dtype(self.storage_dtype))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise FP8Error(f"block_size must be a positive int, got {self.block_size!r}")
        if isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int) or self.channel_axis < 0:
            raise FP8Error(f"channel_axis must be a non-negative int, got {self.channel_axis!r}")
        if isinstance(self.batch_dims, bool) or not isinstance(self.batch_dims, int) or self.batch_dims < 0:
            raise FP8Error(f"batch_dims must be a non-negative int, got {self.batch_dims!r}")
        if self.batch_dims and self.channel_axis < self.batch_dims:
            raise FP8Error(
                f"channel_axis must not be one of the {self.batch_dims} leading batch dims, got channel_axis="
                f"{self.channel_axis}"
            )

    @property
    def fp8_max(self) -> float:
        """The largest finite value of the storage format (448 for e4m3, 57344 for e5m2)."""
        return float(torch.finfo(self.storage_dtype).max)

    def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The leading ``batch_dims`` sizes of ``shape``: one set of scale groups for each index into them."""
        return tuple(shape)[: self.batch_dims]

    def matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The channel-first 2-D view ``(C, K)`` of each matrix of a weight of ``shape`` that scales are grouped on.

        Past the ``batch_dims`` leading dims, ``C`` is the size of the channel axis, ``K`` the product of the
        other dims; a weight without that axis (0-d, or 1-D with axis 1) is one channel.
        """
        shape, axis = tuple(shape)[self.batch_dims :], self.channel_axis - self.batch_dims
        if len(shape) <= axis:
            return 1, math.prod(shape)
        return shape[axis], math.prod(shape[:axis] + shape[axis + 1 :])

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the scale tensor for a weight of ``shape``: the batch dims, then each matrix's scales."""
        batch = self.batch_shape(shape)
        if self.granularity is Granularity.TENSOR:
            return batch
        channels, inner = self.matrix_shape(shape)
        if self.granularity is Granularity.CHANNEL:
            return (*batch, channels)
        return (*batch, math.ceil(channels / self.block_size), math.ceil(inner / self.block_size))

    def matrix(self) -> FP8Layout:
        """The layout of one matrix of a batched weight (``weight[i]``): one batch dim fewer.

        Example:
            >>> FP8Layout("channel", channel_axis=2, batch_dims=1).matrix()
            FP8Layout(granularity='channel', block_size=128, channel_axis=1, storage_dtype=torch.float8_e4m3fn, batch_dims=0)
        """
        if not self.batch_dims:
            raise FP8Error("a layout without batch dims has no matrices to index")
        return self.replace(channel_axis=self.channel_axis - 1, batch_dims=self.batch_dims - 1)

    def replace(self, **changes: object) -> FP8Layout:
        """A copy with some fields changed (validated like a new layout)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready fields (the file format's spelling); :meth:`from_dict` reads them back.

        Example:
            >>> FP8Layout("channel").to_dict()
            {'granularity': 'channel', 'block_size': 128, 'channel_axis': 0, 'storage_dtype': 'e4m3', 'batch_dims': 0}
        """
        return {
            "granularity": self.granularity.value,
            "block_size": self.block_size,
            "channel_axis": self.channel_axis,
            "storage_dtype": storage_name(self.storage_dtype),
            "batch_dims": self.batch_dims,
        }

    @classmethod
    def from_dict(cls, fields: object, where: str = "layout") -> FP8Layout:
        """The layout that :meth:`to_dict` wrote, every field checked (for files, which are not trusted).

        Args:
            fields: a mapping with exactly the keys of :meth:`to_dict` (``batch_dims`` may be absent, as in files
                written before it existed: 0).
            where: what ``fields`` is, for the error message (e.g. ``"layout of 'fc.weight' in model.safetensors"``).

        Raises:
            FP8Error: not a mapping, a missing or unknown key, or a field with a bad value (names ``where`` and
                the field).

        Example:
            >>> FP8Layout.from_dict({"granularity": "block", "block_size": 64, "channel_axis": 0, "storage_dtype": "e5m2"})
            FP8Layout(granularity='block', block_size=64, channel_axis=0, storage_dtype=torch.float8_e5m2, batch_dims=0)
        """
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(fields, Mapping):
            raise FP8Error(f"{where} must be a mapping with keys {names}, got {type(fields).__name__}")
        fields = {"batch_dims": 0, **fields}
        missing = [name for name in names if name not in fields]
        unknown = [str(key) for key in fields if key not in names]
        if missing or unknown:
            raise FP8Error(
                f"{where} must have exactly the keys {names}; "
                + "; ".join(filter(None, [missing and f"missing {missing}", unknown and f"unknown {unknown}"]))
            )
        try:
            return cls(**{name: fields[name] for name in names})  # type: ignore[arg-type]
        except FP8Error as error:  # the field's own message, told where it came from
            raise FP8Error(f"{where}: {error}") from None

"""`FP8Store`: the FP8 weights of a module as a mapping, and its safetensors file format."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._errors import FP8Error
from ._layout import COMPUTE_DTYPES, FP8Layout
from ._options import check_progress_bar, resolve
from ._plan import Plan
from ._tensor import FP8Tensor

__all__ = ["FP8Store"]

logger = logging.getLogger("fp8ctx")

# the config fields an entry records; a file's config metadata holds these
_SCHEME_FIELDS = ("storage_dtype", "granularity", "block_size")


class FP8Store(Mapping[str, FP8Tensor]):
    """The FP8 weights of a module: a mapping from parameter name to :class:`FP8Tensor`.

    Keys are spelled as ``module.named_parameters()`` spells them (``"decoder.conv_in.weight"``, or
    ``"weight"`` for a bare layer). Each entry has ``.dequantize()`` (original dtype) and ``.nbytes``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> store = FP8Store.from_module(model, granularity="channel")
        >>> sorted(store), store.nbytes            # 16*32 + 32*4 FP8 bytes, 32 + 4 float32 scales
        (['0.weight', '2.weight'], 784)
        >>> out = fp8ctx.functional_call(model, store, (torch.randn(2, 16),))   # (2, 4); model untouched
    """

    def __init__(self, entries: Mapping[str, FP8Tensor]) -> None:
        for name, entry in entries.items():
            if not isinstance(entry, FP8Tensor):
                raise FP8Error(f"store entry {name!r} must be an FP8Tensor, got {type(entry).__name__}")
        self._entries = dict(entries)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        config: FP8Config | None = None,
        *,
        storage_dtype: torch.dtype | str | None = None,
        granularity: str | None = None,
        block_size: int | None = None,
        layers: Any = None,
        exclude: Exclude = None,
        progress_bar: bool | None = None,
    ) -> FP8Store:
        """Quantize ``module``'s targeted weights into a new store; ``module`` is only read.

        Args:
            module: the model (or a single layer).
            config: an :class:`FP8Config`; the keywords below that are given (not ``None``) replace its
                fields. Its ``compute`` is not recorded: it is chosen where the store is used.
            storage_dtype, granularity, block_size, layers, exclude: as in :class:`FP8Config`.
            progress_bar: show a tqdm bar; default: only for many layers, when tqdm is installed.

        Returns:
            A new :class:`FP8Store` on the weights' devices.

        Raises:
            FP8Error: a bad option, or a weight that is NaN/Inf, on the meta device or already FP8.
            TypeError: ``module`` is not an ``nn.Module``.
        """
        options = resolve(
            config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size, layers=layers,
            exclude=exclude,
        )
        plan = Plan.make(module, options.config)
        entries = {target.name: entry for target, entry in plan.entries(check_progress_bar(progress_bar))}
        logger.info("fp8ctx: quantized %d weights of %s", len(entries), type(module).__name__)
        return cls(entries)

    @property
    def config(self) -> FP8Config:
        """The scheme the entries are stored in: storage dtype, granularity and block size, read from them.

        The fields a store cannot record are at their defaults: ``layers`` and ``exclude`` (the store's keys
        are the record of which weights were chosen) and ``compute`` (chosen where the store is used). An
        empty store gives ``FP8Config()``.

        Raises:
            FP8Error: entries stored in different schemes (a store combined from others): names two of them.
        """
        schemes: dict[tuple[Any, ...], str] = {}
        for name, entry in self._entries.items():
            schemes.setdefault(_scheme(entry), name)
            if len(schemes) > 1:
                (first, a), (second, b) = schemes.items()
                raise FP8Error(
                    f"this store has no single config: entry {a!r} holds {dict(zip(_SCHEME_FIELDS, first))}, entry "
                    f"{b!r} {dict(zip(_SCHEME_FIELDS, second))}; read each entry's fp8_layout instead"
                )
        if not schemes:
            return FP8Config()
        return FP8Config(*next(iter(schemes)))

    # -- Mapping ---------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> FP8Tensor:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this store; it holds {len(self)} weights, e.g. {list(self)[:3]}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # stores compare by identity: their entries are tensors, and Mapping's value-by-value == would ask a
    # tensor for a truth value
    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    # -- what users ask of a store ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """FP8 codes plus scales, summed over entries."""
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def dense_nbytes(self) -> int:
        """What the same weights take in their original dtype."""
        return sum(entry.numel() * entry.element_size() for entry in self._entries.values())

    def dequantize(self) -> dict[str, torch.Tensor]:
        """Dense copies of every entry in its original dtype (a state-dict fragment)."""
        return {name: entry.dequantize() for name, entry in self._entries.items()}

    def to(self, device: torch.device | str) -> FP8Store:
        """A store with every entry's data and scales on ``device`` (FP8 stays FP8)."""
        return FP8Store({name: entry.to_device(device) for name, entry in self._entries.items()})

    def __repr__(self) -> str:
        schemes = {_scheme(entry) for entry in self._entries.values()}
        if len(schemes) == 1:
            storage_dtype, granularity, _ = next(iter(schemes))
            scheme = f"{storage_dtype}, granularity={str(granularity)!r}, "
        else:
            scheme = "no entries, " if not schemes else f"{len(schemes)} schemes, "
        return (
            f"FP8Store({len(self)} weights, {scheme}"
            f"{self.nbytes / 2**20:.2f} MiB held vs {self.dense_nbytes / 2**20:.2f} MiB dense)"
        )

    # -- files -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to a safetensors file (FP8 codes stay FP8 on disk).

        Each entry is its codes (``name``), its scales (``name:scale``) and, in the metadata, its layout and
        original dtype; the store's config (when its entries share one) is written beside them.

        Raises:
            ImportError: safetensors is not installed (``pip install safetensors``).
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        layouts: dict[str, Any] = {}
        for name, entry in self._entries.items():
            tensors[name] = entry.qdata.contiguous()
            tensors[name + ":scale"] = entry.scale.contiguous()
            layouts[name] = {**entry.fp8_layout.to_dict(), "dtype": str(entry.dtype).removeprefix("torch.")}
        metadata = {"fp8ctx.layouts": json.dumps(layouts)}
        if len({_scheme(entry) for entry in self._entries.values()}) <= 1:
            config = self.config.to_dict()
            metadata["fp8ctx.config"] = json.dumps({field: config[field] for field in _SCHEME_FIELDS})
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> FP8Store:
        """Read a store written by :meth:`save`, onto ``device``; every entry is checked before use.

        Raises:
            FP8Error: the file was not written by ``FP8Store.save``, or an entry's metadata, codes or scales
                do not fit together (names the entry and the field).
        """
        from safetensors import safe_open

        where = os.fspath(path)
        try:
            opened = safe_open(where, framework="pt", device=str(device))
        except FileNotFoundError:
            raise
        except Exception as error:  # safetensors raises its own error type for a file of another format
            raise FP8Error(f"{where!r} is not a safetensors file ({error}); write a store with FP8Store.save") from None
        with opened as handle:
            metadata = handle.metadata() or {}
            if "fp8ctx.layouts" not in metadata:
                raise FP8Error(f"{where!r} is not an fp8ctx store (no fp8ctx metadata); write one with FP8Store.save")
            layouts = _json_object(metadata["fp8ctx.layouts"], where, "fp8ctx.layouts")
            present = set(handle.keys())
            stray = sorted(present - {key for name in layouts for key in (name, name + ":scale")})
            if stray:
                raise FP8Error(f"{where!r} is not an fp8ctx store: tensor(s) {stray[:3]} belong to no entry")
            entries = {name: _read_entry(handle, present, name, fields, where) for name, fields in layouts.items()}
        store = cls(entries)
        if "fp8ctx.config" in metadata:
            written = FP8Config.from_dict(_json_object(metadata["fp8ctx.config"], where, "fp8ctx.config"))
            if entries and store.config != written:
                raise FP8Error(f"{where!r}: the config in its metadata ({written}) does not match its entries")
        return store


def _scheme(entry: FP8Tensor) -> tuple[Any, ...]:
    """An entry's values of the config's scheme fields (``_SCHEME_FIELDS``' order)."""
    return tuple(getattr(entry.fp8_layout, field) for field in _SCHEME_FIELDS)


def _json_object(text: str, where: str, key: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FP8Error(f"{where!r}: metadata {key} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise FP8Error(f"{where!r}: metadata {key} must be a JSON object, got {type(value).__name__}")
    return value


_DENSE_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in COMPUTE_DTYPES}


def _read_entry(handle: Any, present: set[str], name: str, fields: Any, where: str) -> FP8Tensor:
    """One entry of a store file, checked: its layout, original dtype, codes and scales agree."""
    if not isinstance(fields, dict):
        raise FP8Error(f"{where!r}: the layout of entry {name!r} must be an object, got {fields!r}")
    for key in (name, name + ":scale"):
        if key not in present:
            raise FP8Error(f"{where!r}: entry {name!r} has a layout but no tensor {key!r}")
    fields = dict(fields)
    dtype = _DENSE_DTYPES.get(fields.pop("dtype", None))
    if dtype is None:
        raise FP8Error(f"{where!r}: entry {name!r} needs dtype, one of {sorted(_DENSE_DTYPES)}")
    data, scale = handle.get_tensor(name), handle.get_tensor(name + ":scale")
    fields.setdefault("storage_dtype", str(data.dtype))  # files from before the layout named it
    layout = FP8Layout.from_dict(fields, f"{where!r}: layout of entry {name!r}")
    try:
        return FP8Tensor.from_fp8(data, scale, layout, dtype, name=name)
    except FP8Error as error:  # codes and scales that do not fit the layout: say which file
        raise FP8Error(f"{where!r}: {error}") from None

"""`FP8Store`: the FP8 weights of a module as a mapping (and, when complete, its other tensors)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._config import FP8Config
from ._errors import FP8Error
from ._layout import FP8Layout
from ._options import check_progress_bar
from ._progress import progress
from ._devices import check_device
from ._store_sources import StoreSources
from ._storefile import UNQUANTIZED_DTYPES, read_store, write_store
from ._tensor import FP8Tensor

__all__ = ["FP8Store"]

# the config fields an entry records; a file's config metadata holds these
_SCHEME_FIELDS = ("storage_dtype", "granularity", "block_size")


class FP8Store(StoreSources, Mapping[str, FP8Tensor]):
    """The FP8 weights of a module: a mapping from parameter name to :class:`FP8Tensor`.

    Keys are spelled as ``module.named_parameters()`` spells them (``"decoder.conv_in.weight"``, or
    ``"weight"`` for a bare layer). Each entry has ``.dequantize()`` (original dtype) and ``.nbytes``.

    A *complete* store also carries the module's other parameters and its buffers as plain tensors
    (:attr:`unquantized`: norms, biases, tables left dense, rotary ``inv_freq``...), so that the store alone
    runs a skeleton built on the meta device: ``functional_call(skeleton, store, ...)``. The mapping itself
    holds the FP8 entries only.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> store = FP8Store.from_module(model, granularity="channel")
        >>> sorted(store), store.nbytes            # 16*32 + 32*4 FP8 bytes, 32 + 4 float32 scales
        (['0.weight', '2.weight'], 784)
        >>> out = fp8ctx.functional_call(model, store, (torch.randn(2, 16),))   # (2, 4); model untouched
        >>> complete = FP8Store.from_module(model, granularity="channel", complete=True)
        >>> sorted(complete.unquantized), complete.unquantized_nbytes, complete.total_nbytes   # the biases
        (['0.bias', '2.bias'], 144, 928)
    """

    def __init__(
        self,
        entries: Mapping[str, FP8Tensor],
        unquantized: Mapping[str, torch.Tensor] | None = None,
        *,
        complete: bool | None = None,
    ) -> None:
        """
        Args:
            entries: FP8 weights by parameter name.
            unquantized: dense tensors by parameter or buffer name (detached; no FP8 codes).
            complete: whether the store holds every tensor of the module it was made from; default: whether
                ``unquantized`` was given.

        Raises:
            FP8Error: an entry that is not an FP8Tensor, an unquantized tensor that is not a plain tensor of a
                value dtype, or a name in both.
        """
        for name, entry in entries.items():
            if not isinstance(entry, FP8Tensor):
                raise FP8Error(f"store entry {name!r} must be an FP8Tensor, got {type(entry).__name__}")
        dense = dict(unquantized or {})
        for name, tensor in dense.items():
            if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.dtype not in UNQUANTIZED_DTYPES:
                raise FP8Error(
                    f"unquantized tensor {name!r} must be a plain tensor of a value dtype, got "
                    f"{type(tensor).__name__} {getattr(tensor, 'dtype', '')}"
                )
        both = sorted(set(entries) & set(dense))
        if both:
            raise FP8Error(f"{both[:3]} are both FP8 entries and unquantized tensors; a store holds each name once")
        self._entries = dict(entries)
        self._unquantized = {name: tensor.detach() for name, tensor in dense.items()}
        self._complete = bool(unquantized is not None) if complete is None else bool(complete)

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

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled as plain tensors and layout fields, so that loads() rebuilds checked entries; codes travel
        # as their bytes (torch's pickling of float8 storages dumps but does not load back)
        entries = {
            name: (e.qdata.view(torch.uint8), e.scale, e.fp8_layout.to_dict(), e.dtype, e.value_dtype)
            for name, e in self._entries.items()
        }
        return (_rebuild, (entries, self._unquantized, self._complete))

    # -- what users ask of a store ---------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether the store carries every tensor of its module (made with ``complete=True`` or
        :meth:`from_checkpoint`): enough to run a meta-device skeleton."""
        return self._complete

    @property
    def unquantized(self) -> Mapping[str, torch.Tensor]:
        """The dense tensors a complete store carries beside its FP8 entries, by parameter or buffer name
        (read-only mapping)."""
        return MappingProxyType(self._unquantized)

    @property
    def nbytes(self) -> int:
        """FP8 codes plus scales, summed over entries (the unquantized tensors are not counted)."""
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def dense_nbytes(self) -> int:
        """What the FP8 entries' weights take in their original dtype."""
        return sum(entry.numel() * entry.element_size() for entry in self._entries.values())

    @property
    def unquantized_nbytes(self) -> int:
        """Bytes of the dense tensors carried beside the entries (0 unless the store is complete)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._unquantized.values())

    @property
    def total_nbytes(self) -> int:
        """Everything the store holds: :attr:`nbytes` plus :attr:`unquantized_nbytes`."""
        return self.nbytes + self.unquantized_nbytes

    def dequantize(self) -> dict[str, torch.Tensor]:
        """Dense copies of every entry in its original dtype (a state-dict fragment)."""
        return {name: entry.dequantize() for name, entry in self._entries.items()}

    def to(self, device: torch.device | str) -> FP8Store:
        """A store with every entry's data and scales, and every unquantized tensor, on ``device``.

        Raises:
            FP8Error: ``device`` is not a cpu or cuda device of this machine (nothing is copied).
        """
        device = check_device(device)
        return FP8Store(
            {name: entry.to_device(device) for name, entry in self._entries.items()},
            {name: tensor.to(device) for name, tensor in self._unquantized.items()},
            complete=self._complete,
        )

    def __repr__(self) -> str:
        schemes = {_scheme(entry) for entry in self._entries.values()}
        if len(schemes) == 1:
            storage_dtype, granularity, _ = next(iter(schemes))
            scheme = f"{storage_dtype}, granularity={str(granularity)!r}, "
        else:
            scheme = "no entries, " if not schemes else f"{len(schemes)} schemes, "
        text = f"FP8Store({len(self)} weights, {scheme}{_mib(self.nbytes)} held vs {_mib(self.dense_nbytes)} dense"
        if self._complete or self._unquantized:
            text += (
                f"; complete: + {len(self._unquantized)} unquantized tensors {_mib(self.unquantized_nbytes)}, "
                f"{_mib(self.total_nbytes)} in all"
            )
        return text + ")"

    # -- files -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to a safetensors file (FP8 codes stay FP8 on disk), one tensor at a time.

        Each entry is its codes (``name``), its scales (``name:scale``) and, in the metadata, its layout,
        original dtype and value dtype; unquantized tensors are stored under their names. The metadata also
        records the file format, the fp8ctx version and the store's config (when its entries share one).

        The file is written beside ``path`` and renamed onto it once complete: an interrupt, an error or a
        full disk part way leaves whatever was at ``path`` before, never a truncated store.
        """
        config = None
        if len({_scheme(entry) for entry in self._entries.values()}) <= 1:
            fields = self.config.to_dict()
            config = {field: fields[field] for field in _SCHEME_FIELDS}
        write_store(path, self._entries, self._unquantized, self._complete, config)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", *, progress_bar: bool | None = None
    ) -> FP8Store:
        """Read a store written by :meth:`save` straight onto ``device``, every part checked before use.

        Tensors are read one at a time onto ``device`` (no host copy of the whole file). The file is not
        trusted: its format version, every layout field, every tensor's dtype and shape, every scale's sign
        and finiteness and the unquantized tensors' dtypes are checked; nothing in it is executed.

        Args:
            path: the file.
            device: where the tensors go (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
            progress_bar: a tqdm bar while reading; default only for many entries.

        Raises:
            FP8Error: ``device`` is not a device here; the file was not written by ``FP8Store.save``, or any
                part of it is malformed or does not fit (names the file, the entry and the field).
            FileNotFoundError: no such file.
        """
        place = check_device(device)
        bar = check_progress_bar(progress_bar)
        file = read_store(path, place)
        entries, unquantized = file.read(lambda names: progress(names, "fp8ctx: loading", bar))
        store = cls(entries, unquantized if file.format > 1 else None, complete=file.complete)
        if file.config is not None:
            try:
                written = FP8Config.from_dict(file.config)
            except FP8Error as error:
                raise FP8Error(f"{file.path!r}: metadata fp8ctx.config: {error}") from None
            try:
                held = store.config if entries else written
            except FP8Error as error:  # entries of several schemes under one declared config
                raise FP8Error(f"{file.path!r}: metadata fp8ctx.config declares one scheme, but {error}") from None
            if held != written:
                raise FP8Error(f"{file.path!r}: the config in its metadata ({written}) does not match its entries")
        return store


def _rebuild(
    entries: dict[str, tuple[Any, ...]], unquantized: dict[str, torch.Tensor], complete: bool
) -> FP8Store:
    built = {}
    for name, (data, scale, fields, dtype, value_dtype) in entries.items():
        layout = FP8Layout.from_dict(fields)
        codes = data.view(layout.storage_dtype)
        built[name] = FP8Tensor.from_fp8(codes, scale, layout, dtype, name=name, value_dtype=value_dtype)
    return FP8Store(built, unquantized, complete=complete)


def _scheme(entry: FP8Tensor) -> tuple[Any, ...]:
    """An entry's values of the config's scheme fields (``_SCHEME_FIELDS``' order)."""
    return tuple(getattr(entry.fp8_layout, field) for field in _SCHEME_FIELDS)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"

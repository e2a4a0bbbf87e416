"""`FP8Store`: the FP8 weights of a module as a mapping (and, when complete, its other tensors)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._errors import FP8Error
from ._layout import FP8Layout
from ._options import check_progress_bar, resolve
from ._exclude import check_exclude
from ._plan import Plan, unquantized_tensors
from ._progress import progress
from ._devices import check_device
from ._storefile import UNQUANTIZED_DTYPES, read_store, write_store
from ._tensor import FP8Tensor

__all__ = ["FP8Store"]

logger = logging.getLogger("fp8ctx")

# the config fields an entry records; a file's config metadata holds these
_SCHEME_FIELDS = ("storage_dtype", "granularity", "block_size")


class FP8Store(Mapping[str, FP8Tensor]):
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
        complete: bool = False,
    ) -> FP8Store:
        """Quantize ``module``'s targeted weights into a new store; ``module`` is only read.

        Args:
            module: the model (or a single layer).
            config: an :class:`FP8Config`; the keywords below that are given (not ``None``) replace its
                fields. Its ``compute`` is not recorded: it is chosen where the store is used.
            storage_dtype, granularity, block_size, layers, exclude: as in :class:`FP8Config`.
            progress_bar: show a tqdm bar; default: only for many layers, when tqdm is installed.
            complete: also copy every other parameter and every buffer (persistent or not) as a dense
                tensor, so the store alone runs a meta-device skeleton of the module.

        Returns:
            A new :class:`FP8Store` on the weights' devices.

        Raises:
            FP8Error: a bad option, or a weight that is NaN/Inf, on the meta device or already FP8.
            TypeError: ``module`` is not an ``nn.Module``.
        """
        if not isinstance(complete, bool):
            raise FP8Error(f"complete must be True or False, got {complete!r}")
        options = resolve(
            config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size, layers=layers,
            exclude=exclude,
        )
        check_exclude([module], options.config.exclude)
        plan = Plan.make(module, options.config)
        entries = {target.name: entry for target, entry in plan.entries(check_progress_bar(progress_bar))}
        unquantized = None
        if complete:
            unquantized = {name: tensor.detach().clone() for name, tensor in unquantized_tensors(module, plan.targets)}
            meta = [name for name, tensor in unquantized.items() if tensor.is_meta]
            if meta:
                raise FP8Error(f"{meta[:5]} of {type(module).__name__} are on the meta device: no values to copy")
        logger.info("fp8ctx: quantized %d weights of %s", len(entries), type(module).__name__)
        return cls(entries, unquantized, complete=complete)

    @classmethod
    def from_checkpoint(
        cls,
        skeleton: nn.Module,
        path: str | os.PathLike[str],
        config: FP8Config | None = None,
        *,
        storage_dtype: torch.dtype | str | None = None,
        granularity: str | None = None,
        block_size: int | None = None,
        layers: Any = None,
        exclude: Exclude = None,
        progress_bar: bool | None = None,
        strict: bool = True,
        device: torch.device | str = "cpu",
    ) -> FP8Store:
        """A complete store read from a safetensors checkpoint tensor by tensor; no dense model is built.

        The skeleton (typically built on the meta device) names the tensors and their dtypes; its targets are
        chosen by the same rules as :meth:`from_module`. Checkpoint names are mapped to the skeleton's as
        transformers maps them (its key renames, the ``base_model_prefix`` added or stripped) and tied weights
        are read once. Each tensor is read, cast to the skeleton's dtype and quantized (or kept) before the
        next is read: the extra host memory is about the largest tensor, plus the store being built.

        Args:
            skeleton: the model to build the store for; only its names, shapes and dtypes are read.
            path: a ``.safetensors`` file, or a directory with one, or with a sharded checkpoint and its
                ``*.safetensors.index.json`` (as transformers and diffusers write them).
            config, storage_dtype, granularity, block_size, layers, exclude, progress_bar: as in
                :meth:`from_module`.
            strict: refuse checkpoint tensors the skeleton has no place for (``False``: skip them, e.g. the
                vision tower when building the text model's store from a full checkpoint).
            device: where to quantize and keep the store (``"cuda"``: the rows read go to the device and are
                quantized there; the same codes as on the CPU).

        Returns:
            A complete :class:`FP8Store` on ``device``.

        Raises:
            FP8Error: a bad option; a checkpoint that cannot be read; one error listing the skeleton's
                tensors the checkpoint lacks, the tensors of the wrong shape and (``strict``) the tensors
                left over.
        """
        from ._checkpoint import read_checkpoint

        options = resolve(
            config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size, layers=layers,
            exclude=exclude,
        )
        check_exclude([skeleton], options.config.exclude)
        place = check_device(device)
        if not isinstance(strict, bool):
            raise FP8Error(f"strict must be True or False, got {strict!r}")
        entries, unquantized = read_checkpoint(
            skeleton, path, options.config, progress_bar=check_progress_bar(progress_bar), strict=strict, device=place
        )
        return cls(entries, unquantized, complete=True)

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

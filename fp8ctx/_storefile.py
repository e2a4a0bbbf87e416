"""The store file: a safetensors file written tensor by tensor, read back validated in full.

Layout of a file (format 2): for each FP8 entry the codes (``name``) and the float32 scales
(``name:scale``); for each unquantized tensor of a complete store its values (``name``). The metadata holds
``fp8ctx.format`` (this format's number), ``fp8ctx.version`` (the library that wrote it),
``fp8ctx.layouts`` (per entry: its :class:`FP8Layout` fields, ``dtype`` and ``value_dtype``),
``fp8ctx.unquantized`` (the names of the dense tensors), ``fp8ctx.complete`` and, when the entries share
one, ``fp8ctx.config``. Files without ``fp8ctx.format`` are format 1 (entries only).

A file is untrusted: :func:`read_store` checks every metadata field, every tensor's dtype and shape against
the layouts, and every scale's value before it returns anything, and reports any problem as one
:class:`FP8Error` naming the file and the field. Nothing in a file is executed or imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._errors import FP8Error
from ._layout import COMPUTE_DTYPES, FP8Layout
from ._safetensors import DTYPES, TensorReader, write_safetensors
from ._tensor import FP8Tensor
from ._version import __version__

__all__ = ["FORMAT", "StoreFile", "read_store", "write_store"]

FORMAT = 2

# what an unquantized tensor may be: model values (float) and index/count buffers (int, bool); FP8 codes
# outside an entry would be read as if they were values
UNQUANTIZED_DTYPES = tuple(dtype for dtype in DTYPES.values() if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2))


# -- writing --------------------------------------------------------------------------------------------


def write_store(
    path: str | os.PathLike[str],
    entries: Mapping[str, FP8Tensor],
    unquantized: Mapping[str, torch.Tensor],
    complete: bool,
    config: Mapping[str, Any] | None,
) -> None:
    """Write a store, one tensor in host memory at a time (never the whole file)."""
    clash = sorted(set(entries) & set(unquantized))
    if clash:
        raise FP8Error(f"names {clash[:3]} are both FP8 entries and unquantized tensors; a store holds each once")
    layouts = {
        name: {
            **entry.fp8_layout.to_dict(),
            "dtype": _spell(entry.dtype),
            "value_dtype": _spell(entry.value_dtype),
        }
        for name, entry in entries.items()
    }
    metadata = {
        "fp8ctx.format": str(FORMAT),
        "fp8ctx.version": __version__,
        "fp8ctx.layouts": json.dumps(layouts),
        "fp8ctx.unquantized": json.dumps(list(unquantized)),
        "fp8ctx.complete": json.dumps(complete),
    }
    if config is not None:
        metadata["fp8ctx.config"] = json.dumps(dict(config))
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        tensors[name], tensors[name + ":scale"] = entry.qdata, entry.scale
    tensors.update(unquantized)
    write_safetensors(os.fspath(path), tensors, metadata)


def _spell(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- reading --------------------------------------------------------------------------------------------


class StoreFile:
    """A store file's metadata and headers, checked in full; :meth:`read` then reads and checks the values."""

    def __init__(self, path: str | os.PathLike[str], device: torch.device) -> None:
        self.path = where = os.fspath(path)
        self.reader = reader = TensorReader(where, device)
        metadata = reader.metadata
        if "fp8ctx.layouts" not in metadata:
            raise FP8Error(f"{where!r} is not an fp8ctx store (no fp8ctx metadata); write one with FP8Store.save")
        self.format = _format(metadata.get("fp8ctx.format", "1"), where)
        self.version = str(metadata.get("fp8ctx.version", "before 0.1"))
        raw_layouts = _json(metadata["fp8ctx.layouts"], where, "fp8ctx.layouts", dict)
        self.unquantized: list[str] = _json(metadata.get("fp8ctx.unquantized", "[]"), where, "fp8ctx.unquantized", list)
        self.complete: bool = _json(metadata.get("fp8ctx.complete", "false"), where, "fp8ctx.complete", bool)
        self.config: dict[str, Any] | None = None
        if "fp8ctx.config" in metadata:
            self.config = _json(metadata["fp8ctx.config"], where, "fp8ctx.config", dict)
        self.layouts = {name: self._check_entry(name, fields) for name, fields in raw_layouts.items()}
        twice = sorted({str(name) for name in self.unquantized if self.unquantized.count(name) > 1})
        if twice:
            raise FP8Error(f"{where!r}: fp8ctx.unquantized lists {twice[:3]} more than once; a store holds each name once")
        for name in self.unquantized:
            self._check_unquantized(name)
        claimed = {key for name in self.layouts for key in (name, name + ":scale")} | set(self.unquantized)
        stray = sorted(set(reader.keys) - claimed)
        if stray:
            raise FP8Error(
                f"{where!r} is not an fp8ctx store as written: tensor(s) {stray[:3]} belong to no entry in "
                "fp8ctx.layouts or fp8ctx.unquantized (a damaged or edited file)"
            )

    def _check_entry(self, name: object, fields: object) -> tuple[FP8Layout, torch.dtype, torch.dtype]:
        where = self.path
        if not isinstance(fields, dict):
            raise FP8Error(f"{where!r}: the layout of entry {name!r} must be an object, got {type(fields).__name__}")
        fields = dict(fields)
        dtype = _compute_dtype(fields.pop("dtype", None), where, name, "dtype")
        value_dtype = _compute_dtype(fields.pop("value_dtype", _spell(dtype)), where, name, "value_dtype")
        for key in (str(name), f"{name}:scale"):
            if key not in self.reader.headers:
                raise FP8Error(f"{where!r}: entry {name!r} has a layout but no tensor {key!r}")
        code_dtype, shape = self.reader.headers[str(name)]
        if self.format == 1:  # files from before the layout named its storage dtype
            fields.setdefault("storage_dtype", _spell(code_dtype) if code_dtype else "?")
        layout = FP8Layout.from_dict(fields, f"{where!r}: layout of entry {name!r}")
        if code_dtype != layout.storage_dtype:
            raise FP8Error(
                f"{where!r}: entry {name!r}: codes must be a {layout.storage_dtype} tensor as its layout says, got "
                f"{code_dtype or 'a dtype no store holds'}"
            )
        if shape and layout.channel_axis >= len(shape):
            raise FP8Error(f"{where!r}: entry {name!r}: channel_axis {layout.channel_axis} is not an axis of {shape}")
        scale_dtype, scale_shape = self.reader.headers[f"{name}:scale"]
        want = layout.scale_shape(shape)
        if scale_dtype != torch.float32 or scale_shape != want:
            raise FP8Error(
                f"{where!r}: entry {name!r}: scales must be float32 of shape {want} for {layout} and codes {shape}, "
                f"got {scale_dtype} {scale_shape}"
            )
        return layout, dtype, value_dtype

    def _check_unquantized(self, name: object) -> None:
        where = self.path
        if not isinstance(name, str) or name not in self.reader.headers:
            raise FP8Error(f"{where!r}: fp8ctx.unquantized lists {name!r}, which has no tensor in the file")
        if name in self.layouts:
            raise FP8Error(f"{where!r}: {name!r} is both an FP8 entry and an unquantized tensor")
        if name.endswith(":scale") and name.removesuffix(":scale") in self.layouts:
            raise FP8Error(f"{where!r}: fp8ctx.unquantized lists {name!r}, the scales of FP8 entry "
                           f"{name.removesuffix(':scale')!r}; a tensor belongs to one place")
        dtype = self.reader.headers[name][0]
        if dtype not in UNQUANTIZED_DTYPES:
            raise FP8Error(
                f"{where!r}: unquantized tensor {name!r} must be one of {[_spell(d) for d in UNQUANTIZED_DTYPES]}, got "
                f"{dtype or 'a dtype no store holds'}"
            )

    def read(self, progress: Any = None) -> tuple[dict[str, FP8Tensor], dict[str, torch.Tensor]]:
        """Every entry and unquantized tensor, each checked (scales positive and finite) as it is read."""
        entries: dict[str, FP8Tensor] = {}
        items: Iterable[str] = list(self.layouts)
        for name in progress(items) if progress else items:
            layout, dtype, value_dtype = self.layouts[name]
            codes, scale = self.reader.get(name), self.reader.get(name + ":scale")
            try:
                entries[name] = FP8Tensor.from_fp8(codes, scale, layout, dtype, name=name, value_dtype=value_dtype)
            except FP8Error as error:  # damaged values: say which file
                raise FP8Error(f"{self.path!r}: {error}") from None
        unquantized = {name: self.reader.get(name) for name in self.unquantized}
        self.reader.close()
        return entries, unquantized


def read_store(path: str | os.PathLike[str], device: torch.device) -> StoreFile:
    """The store file at ``path`` with its metadata checked (see :class:`StoreFile`)."""
    return StoreFile(path, device)


def _format(value: str, where: str) -> int:
    if value not in {str(n) for n in range(1, FORMAT + 1)}:
        raise FP8Error(
            f"{where!r}: fp8ctx.format is {value!r}; this fp8ctx ({__version__}) reads formats 1 to {FORMAT}. "
            "A newer fp8ctx wrote it: upgrade fp8ctx"
        )
    return int(value)


def _json(text: str, where: str, key: str, kind: type) -> Any:
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, TypeError, RecursionError) as error:
        raise FP8Error(f"{where!r}: metadata {key} is not JSON ({error})") from None
    except _DuplicateKey as duplicate:
        raise FP8Error(f"{where!r}: metadata {key} names {duplicate.args[0]!r} twice; a store holds each name once") from None
    if type(value) is not kind:
        raise FP8Error(f"{where!r}: metadata {key} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


class _DuplicateKey(Exception):
    """A JSON object naming a key twice (``json`` would silently keep the last)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _DuplicateKey(key)
        value[key] = item
    return value


_COMPUTE_NAMES = {_spell(dtype): dtype for dtype in COMPUTE_DTYPES}


def _compute_dtype(value: object, where: str, name: object, field: str) -> torch.dtype:
    dtype = _COMPUTE_NAMES.get(value) if isinstance(value, str) else None
    if dtype is None:
        raise FP8Error(
            f"{where!r}: entry {name!r} needs {field}, one of {[_spell(d) for d in COMPUTE_DTYPES]}, got {value!r}"
        )
    return dtype  # type: ignore[return-value]


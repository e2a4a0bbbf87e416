"""Quantizing straight from a safetensors checkpoint: one tensor in memory at a time, no dense model.

The skeleton (usually on the meta device) says which tensors exist, their shapes and dtypes, and which
weights are targets (the selection rule of ``_select``); the checkpoint gives the values. Checkpoint names are
mapped to the skeleton's before anything is read, and every problem is reported in one error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from . import _numerics
from ._config import FP8Config
from ._errors import FP8Error
from ._layout import FP8Layout, Granularity
from ._select import Target, select_targets
from ._progress import progress
from ._safetensors import TensorReader
from ._tensor import FP8Tensor
from .integrations import transformers_keys

__all__ = ["checkpoint_files", "read_checkpoint"]

logger = logging.getLogger("fp8ctx")


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, a directory's one file, or the shards its
    ``*.safetensors.index.json`` lists.

    Raises:
        FP8Error: nothing to read, several candidates, or an index that is malformed or points outside its
            directory.
    """
    where = Path(path)
    if where.is_file():
        return [where]
    if not where.is_dir():
        raise FP8Error(f"checkpoint {str(where)!r} is neither a file nor a directory")
    indexes = sorted(where.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise FP8Error(f"checkpoint directory {str(where)!r} has several indexes {[p.name for p in indexes]}; pass one shard set's directory")
    if indexes:
        return _shards(indexes[0])
    files = sorted(where.glob("*.safetensors"))
    if len(files) != 1:
        raise FP8Error(
            f"checkpoint directory {str(where)!r} has {len(files)} .safetensors files {[p.name for p in files][:5]} and no "
            "*.safetensors.index.json; pass the file to read"
        )
    return files


def _shards(index: Path) -> list[Path]:
    try:
        content = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FP8Error(f"{str(index)!r} is not readable JSON: {error}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FP8Error(f"{str(index)!r} needs a weight_map object of tensor name -> shard file name")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # an index names files beside it; anything else (a path, '..') is not a shard of this checkpoint
        if Path(shard).name != shard or not shard.endswith(".safetensors") or not (index.parent / shard).is_file():
            raise FP8Error(f"{str(index)!r} lists shard {shard!r}, which is not a .safetensors file beside it")
    return [index.parent / shard for shard in shards]


@dataclasses.dataclass
class _Source:
    reader: TensorReader
    key: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]


def read_checkpoint(
    skeleton: nn.Module,
    path: str | os.PathLike[str],
    config: FP8Config,
    *,
    progress_bar: bool | None,
    strict: bool,
    device: torch.device = torch.device("cpu"),
) -> tuple[dict[str, FP8Tensor], dict[str, torch.Tensor]]:
    """The FP8 entries and unquantized tensors of a complete store for ``skeleton``, read from ``path``.

    Raises:
        FP8Error: see :meth:`FP8Store.from_checkpoint`.
    """
    if not isinstance(skeleton, nn.Module):
        raise TypeError(f"from_checkpoint() takes the model's skeleton (an nn.Module), got {type(skeleton).__name__}")
    readers = [TensorReader(os.fspath(file)) for file in checkpoint_files(path)]
    tensors = {**dict(skeleton.named_parameters()), **dict(skeleton.named_buffers())}
    first = {id(tensor): name for name, tensor in reversed(tensors.items())}
    # every name of every parameter and buffer (tied aliases too) -> the name the store uses
    aliases = {
        name: first[id(tensor)]
        for name, tensor in [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers(remove_duplicate=False)]
    }
    rename = transformers_keys.key_renamer(skeleton)
    ignored = transformers_keys.ignored_keys(skeleton)
    sources: dict[str, _Source] = {}
    unused, converted = [], []
    for reader in readers:
        for key in reader.keys:
            mapped = rename(key)
            if mapped is None:
                converted.append(key)
                continue
            name = aliases.get(mapped)
            if name is None:
                if not any(pattern.search(key) for pattern in ignored):
                    unused.append(key)
                continue
            dtype, shape = reader.headers[key]
            sources.setdefault(name, _Source(reader, key, dtype, shape))  # a tied weight is read once
    absent = [name for name in tensors if name not in sources]
    without = _without_checkpoint(skeleton, absent, tensors)
    missing, wrong = [name for name in absent if name not in without], []
    for name, tensor in tensors.items():
        source = sources.get(name)
        if source is None:
            continue
        if source.shape != tuple(tensor.shape) or source.dtype is None or (
            source.dtype.is_floating_point != tensor.dtype.is_floating_point
        ):
            wrong.append(f"{source.key}: {source.dtype} {source.shape} for {tuple(tensor.shape)} {tensor.dtype}")
    if missing or wrong or converted or (strict and unused):
        raise FP8Error(_mismatch_message(skeleton, path, missing, wrong, converted, unused if strict else []))
    if unused:
        logger.info("fp8ctx: skipping %d checkpoint tensors the skeleton has no place for, e.g. %s", len(unused), unused[:3])
    targets = {target.name: target for target in select_targets(skeleton, config)}
    entries, unquantized = _read(sources, tensors, targets, config, progress_bar, device)
    for name, value in without.items():  # the skeleton's own values (a loaded part), or derived buffers
        value = value.to(device)
        target = targets.get(name)
        if target is not None:
            entries[name] = FP8Tensor.from_dense(value, target.layout(config), name=name)
        else:
            unquantized[name] = value
    for reader in readers:
        reader.close()
    order = list(tensors)
    return (
        {name: entries[name] for name in order if name in entries},
        {name: unquantized[name] for name in order if name in unquantized},
    )


def _read(
    sources: dict[str, _Source],
    tensors: dict[str, torch.Tensor],
    targets: dict[str, Target],
    config: FP8Config,
    progress_bar: bool | None,
    device: torch.device,
) -> tuple[dict[str, FP8Tensor], dict[str, torch.Tensor]]:
    """Read each source once, cast it to the skeleton's dtype, quantize the targets; one tensor at a time."""
    entries: dict[str, FP8Tensor] = {}
    unquantized: dict[str, torch.Tensor] = {}
    for name in progress(list(sources), "fp8ctx: quantizing from checkpoint", progress_bar):
        source, wanted = sources[name], tensors[name].dtype
        target = targets.get(name)
        if target is not None:
            entries[name] = _quantize_streamed(source, wanted, target.layout(config), name, device)
        else:
            unquantized[name] = source.reader.get(source.key).to(device=device, dtype=wanted)
    return entries, unquantized


# rows of a weight read and quantized at once: the working memory per weight (float32 temporaries)
_CHUNK_BYTES = 2**20
# quantizing on an accelerator: its temporaries are device memory; the host holds only the read rows
_DEVICE_CHUNK_BYTES = 16 * 2**20


def _quantize_streamed(
    source: _Source, dtype: torch.dtype, layout: FP8Layout, name: str, device: torch.device
) -> FP8Tensor:
    """Quantize a checkpoint tensor a few rows at a time, into codes allocated once.

    The codes and scales are the very ones :meth:`FP8Tensor.from_dense` gives for the whole tensor: each
    scale group lies within whole rows (a row, or a row of blocks), and a tensor-wide scale is the
    largest of the chunks' amaxes. Reading whole tensors instead would leave each one's float32 temporaries
    to the allocator, which does not give them back in time: peak memory then grows with the model.
    """
    shape = source.shape
    if not shape or layout.channel_axis != 0 or layout.batch_dims or 0 in shape:  # whole: groups span dim 0
        value = source.reader.get(source.key).to(device=device, dtype=dtype)
        return FP8Tensor.from_dense(value, layout, name=name)
    rows, inner = shape[0], math.prod(shape[1:])
    budget = _CHUNK_BYTES if device.type == "cpu" else _DEVICE_CHUNK_BYTES
    step = max(1, budget // max(1, inner * 4))
    if layout.granularity is Granularity.BLOCK:
        step = max(layout.block_size, step // layout.block_size * layout.block_size)

    def chunks():
        for start in range(0, rows, step):
            chunk = source.reader.get_rows(source.key, start, min(rows, start + step))
            yield start, chunk.to(device=device, dtype=dtype).reshape(-1, inner)

    # the codes and the scales are allocated once, before the chunks: small tensors kept per chunk would lie
    # between the chunks' freed temporaries and keep the host heap from reusing them (on torch 2.6, RSS then grew
    # by 12.6 MB per 16 MB float32 weight whose codes are 4 MB; 6 MB per weight with them allocated once)
    codes = torch.empty((rows, inner), dtype=layout.storage_dtype, device=device)
    if layout.granularity is Granularity.TENSOR:
        amax = torch.zeros((), dtype=torch.float32, device=device)
        for _, chunk in chunks():  # torch.maximum keeps a NaN of any chunk (max() of floats drops a later one)
            amax = torch.maximum(amax, torch.linalg.vector_norm(chunk, ord=math.inf).float())
        scale = _numerics.scale_from_amax(amax, layout.fp8_max)
        _check_finite(scale, name)
    else:
        scale = torch.empty(layout.scale_shape((rows, inner)), dtype=torch.float32, device=device)
    group_rows = 1 if layout.granularity is Granularity.CHANNEL else layout.block_size
    for start, chunk in chunks():
        if layout.granularity is Granularity.TENSOR:
            chunk_scale = scale
        else:
            chunk_scale = _numerics.compute_scale(chunk, layout)
            _check_finite(chunk_scale, name)
            scale[start // group_rows : start // group_rows + chunk_scale.shape[0]] = chunk_scale
        codes[start : start + chunk.shape[0]] = _numerics.quantize(chunk, chunk_scale, layout)
    return FP8Tensor.from_fp8(codes.reshape(shape), scale, layout, dtype, name=name)


def _check_finite(scale: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise FP8Error(
            f"weight {name!r} contains NaN or Inf in the checkpoint; FP8 cannot represent it. Leave its layer out "
            "with exclude="
        )


def _without_checkpoint(skeleton: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values for the skeleton's tensors the checkpoint lacks: its own where it has them, else derived."""
    values = {name: tensors[name].detach().clone() for name in names if not tensors[name].is_meta}
    derived = [name for name in names if tensors[name].is_meta]
    for name, value in transformers_keys.derive_buffers(skeleton, derived).items():
        values[name] = value.to(tensors[name].dtype)  # the dtype the skeleton declares, as read tensors are cast
    return values


def _mismatch_message(
    skeleton: nn.Module, path: object, missing: list[str], wrong: list[str], converted: list[str], unused: list[str]
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint: {_few(missing)}")
    if wrong:
        parts.append(f"{len(wrong)} do not fit the model: {_few(wrong)}")
    if converted:
        parts.append(f"{len(converted)} need a tensor conversion (merged or split by transformers): {_few(converted)}")
    if unused:
        parts.append(f"{len(unused)} checkpoint tensor(s) have no place in the model: {_few(unused)} (strict=False skips them)")
    way_out = ". Build the skeleton from the checkpoint's own config"
    if converted:
        # transformers merges or splits these while loading (per-expert tensors into one experts tensor, ...):
        # from_checkpoint reads tensors one by one under the skeleton's names and does not run those conversions
        way_out += (
            "; for tensors transformers converts while loading, load the model once with from_pretrained and build "
            "the store with FP8Store.from_module(model, complete=True), then save it"
        )
    return f"checkpoint {os.fspath(path)!r} does not match {type(skeleton).__name__}: " + "; ".join(parts) + way_out


def _few(names: list[str]) -> str:
    return repr(names[:6])[:-1] + (", ...]" if len(names) > 6 else "]")


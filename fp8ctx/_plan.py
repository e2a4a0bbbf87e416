"""The plan record: for each module, its targets and where their FP8 entries come from.

Which weights are targets is ``_select``'s rule; here a store's entries are matched to a module instead, a meta
skeleton's other tensors to the store's dense ones, plans are checked against each other, and entries are made one
weight at a time. Everything here reads modules and computes; nothing changes a module (holding is ``_hold``'s job).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _fsdp
from ._claims import finish_ended
from ._config import FP8Config
from ._errors import FP8Error
from ._progress import progress
from ._select import Target, find_targets
from ._tensor import FP8Tensor
from .integrations.offload import meta_weight_advice, offloaded_by_accelerate, under

logger = logging.getLogger("fp8ctx")

__all__ = [
    "Fill",
    "Plan",
    "check_overlap",
    "meta_fills",
    "quantize_target",
    "targets_from_store",
    "unquantized_tensors",
]


def targets_from_store(module: nn.Module, store: Mapping[str, FP8Tensor]) -> list[Target]:
    """Match a store's entries to ``module``'s parameters, checking name, shape, dtype and device.

    Raises:
        TypeError: ``store`` is not a mapping.
        FP8Error: an entry the module lacks or does not fit; a weight that is already FP8.
    """
    if not isinstance(store, Mapping):
        raise TypeError(f"store must be an FP8Store (FP8Store.from_module(module)), got {type(store).__name__}")
    params = dict(module.named_parameters())
    targets = []
    for name, entry in store.items():
        param = params.get(name)
        if param is None:
            raise FP8Error(
                f"the store has {name!r} but {type(module).__name__} has no such parameter: the store was built for "
                "another module. Build one for this module with FP8Store.from_module(module)"
            )
        if not isinstance(entry, FP8Tensor):
            raise FP8Error(f"store entry {name!r} must be an FP8Tensor, got {type(entry).__name__}")
        if isinstance(param, FP8Tensor):
            raise FP8Error(
                f"weight {name!r} is already held as FP8: this module is inside fp8_weights() or a running "
                "functional_call() already (in this or another thread)"
            )
        if param.shape != entry.shape or param.dtype != entry.dtype:
            raise FP8Error(
                f"store entry {name!r} is {tuple(entry.shape)} {entry.dtype}, the parameter is "
                f"{tuple(param.shape)} {param.dtype}; rebuild the store with FP8Store.from_module(module)"
            )
        if param.device != entry.device and not param.is_meta:  # a meta skeleton runs on the store's device
            raise FP8Error(
                f"store entry {name!r} is on {entry.device}, the parameter on {param.device}; "
                f"move the store with store.to({str(param.device)!r})"
            )
        layout = entry.fp8_layout
        targets.append(Target(name, name.rpartition(".")[0], param, layout.channel_axis, layout.batch_dims))
    return targets


def _refuse_offloaded_entries(module: nn.Module, store: Mapping[str, FP8Tensor]) -> None:
    """Raise if the store holds a weight of a layer that accelerate offloads (its hook would overwrite it)."""
    offloaded = offloaded_by_accelerate(module)
    if not offloaded or not isinstance(store, Mapping):
        return
    for name in store:
        parent = under(name.rpartition(".")[0], offloaded)
        if parent is not None:
            raise FP8Error(
                f"store entry {name!r} belongs to layer {parent or type(module).__name__!r}, which accelerate "
                f"offloads. {meta_weight_advice(module)} With a store, build it for the resident layers only: "
                "FP8Store.from_module(model, exclude=[...])."
            )


def check_overlap(plans: Sequence[Plan]) -> None:
    """Raise if one weight is planned for two of the modules (one module passed twice, or inside another).

    Raises:
        FP8Error: names the weight and the two argument positions.
    """
    owners: dict[int, int] = {}
    for index, plan in enumerate(plans):
        for target in plan.targets:
            other = owners.setdefault(id(target.param), index)
            if other != index:
                raise FP8Error(
                    f"weight {target.name!r} belongs to argument {other} and argument {index} of fp8_weights(); "
                    "pass each module once (the outer one if one contains the other)"
                )


def quantize_target(target: Target, config: FP8Config) -> FP8Tensor:
    """Quantize one target weight into a new FP8Tensor; the weight itself is only read.

    Raises:
        FP8Error: the weight holds NaN or Inf (names the parameter and how to leave its layer out).
    """
    return FP8Tensor.from_dense(target.param, target.layout(config), name=target.name)


def unquantized_tensors(module: nn.Module, targets: Sequence[Target]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of ``module`` that is not a target, then every buffer (persistent or not), each once
    under its first name: what a complete store carries beside its FP8 entries."""
    held = {id(target.param) for target in targets}
    for name, param in module.named_parameters():
        if id(param) not in held:
            yield name, param
    yield from module.named_buffers()


@dataclasses.dataclass(frozen=True)
class Fill:
    """A tensor of a meta-device skeleton and the store's dense tensor that takes its place while held."""

    name: str
    kind: str  # "parameter" or "buffer"
    tensor: torch.Tensor  # the skeleton's own (on meta)
    value: torch.Tensor  # the store's


def meta_fills(module: nn.Module, store: Mapping[str, FP8Tensor], targets: Sequence[Target]) -> list[Fill]:
    """What fills ``module``'s meta-device tensors from a complete ``store`` (nothing for a loaded module).

    Raises:
        FP8Error: one error naming every meta tensor the store does not hold (and how to get a complete
            store), or one whose dense value has another shape or dtype.
    """
    dense: Mapping[str, torch.Tensor] = getattr(store, "unquantized", {})
    held = {id(target.param) for target in targets}
    offloaded = offloaded_by_accelerate(module)  # accelerate's hooks fill those layers' meta tensors
    candidates = [
        *((name, "parameter", p) for name, p in module.named_parameters() if id(p) not in held),
        *((name, "buffer", b) for name, b in module.named_buffers()),
    ]
    fills, missing, wrong = [], [], []
    for name, kind, tensor in candidates:
        if not tensor.is_meta or (offloaded and under(name.rpartition(".")[0], offloaded) is not None):
            continue
        value = dense.get(name)
        if value is None:
            missing.append(name)
        elif value.shape != tensor.shape or value.dtype != tensor.dtype:
            wrong.append(f"{name} ({tuple(value.shape)} {value.dtype} in the store, {tuple(tensor.shape)} {tensor.dtype} here)")
        else:
            fills.append(Fill(name, kind, tensor, value))
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"the store does not hold {len(missing)} of them: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if wrong:
            problems.append(f"{len(wrong)} do not fit: {wrong[:4]}")
        raise FP8Error(
            f"{type(module).__name__} has tensors on the meta device, which the store must fill; "
            + "; ".join(problems)
            + ". Use a complete store: FP8Store.from_module(model, complete=True) or FP8Store.from_checkpoint(skeleton, "
            "path), built for this model in its dtype"
        )
    return fills


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to hold for one module: its targets, and where their entries come from (a given store, or
    quantizing with ``config``)."""

    module: nn.Module
    targets: tuple[Target, ...]
    config: FP8Config
    store: Mapping[str, FP8Tensor] | None = None
    # FSDP2's record of each target that is a sharded DTensor, by id(param): held as FP8 shards (see _fsdp)
    sharded: Mapping[int, Any] = dataclasses.field(default_factory=dict)
    fills: tuple[Fill, ...] = ()

    @classmethod
    def make(cls, module: nn.Module, config: FP8Config, store: Mapping[str, FP8Tensor] | None = None) -> Plan:
        """The plan for ``module``: the store's entries matched to it (and, for a meta-device skeleton, the
        store's dense tensors for its other tensors), or the targets ``config`` selects."""
        finish_ended(module)  # a functional_call that ended without restoring: read the originals, not its stand-ins
        if store is not None:
            _refuse_offloaded_entries(module, store)
        targets = targets_from_store(module, store) if store is not None else find_targets(module, config)
        if not targets and store is None:
            _say_nothing_is_held(module, config)
        layouts = [target.layout(config) for target in targets]
        sharded = _fsdp.check_sharded(module, targets, layouts, store is not None)
        fills = tuple(meta_fills(module, store, targets)) if store is not None else ()
        return cls(module, tuple(targets), config, store, sharded=sharded, fills=fills)

    def entries(self, progress_bar: bool | None = None) -> Iterator[tuple[Target, FP8Tensor]]:
        """Each target with its FP8 entry, made one at a time (so that a caller can swap in and offload
        weight by weight: the peak is the dense model plus one layer's temporaries, not dense + FP8)."""
        if self.store is not None:  # nothing to wait for when reusing a store
            for target in self.targets:
                yield target, self.store[target.name]
            return
        for target in progress(self.targets, "fp8ctx: quantizing", progress_bar):
            record = self.sharded.get(id(target.param))
            if record is not None:  # this rank's FSDP2 shard, with the unsharded weight's scales
                layout = target.layout(self.config)
                yield target, _fsdp.quantize_shard(record, target.param, layout, target.name)
            else:
                yield target, quantize_target(target, self.config)


def _say_nothing_is_held(module: nn.Module, config: FP8Config) -> None:
    # not an error (a pipeline component may have no such layer), but never silent: a layer type without a weight
    # in layers= (nn.ReLU), or an exclusion that covers everything, would otherwise look like a working hold
    kinds = ", ".join(layer.__name__ for layer in config.layers)
    excluded = f" outside the {len(config.exclude)} exclusion rule(s)" if config.exclude else ""
    logger.warning(
        "fp8ctx: nothing of %s is held as FP8: it has no weight in a layer of the types (%s)%s; check layers= and "
        "exclude= (a type without a weight, such as nn.ReLU, holds nothing)",
        type(module).__name__, kinds, excluded,
    )

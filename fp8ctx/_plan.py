"""Planning: which weights of a module are held as FP8, and the FP8 entry each one gets.

Everything here reads modules and computes; nothing changes a module (holding is ``_hold``'s job).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _fsdp
from ._config import ExcludeRule, FP8Config
from ._errors import FP8Error
from ._layout import COMPUTE_DTYPES, FP8Layout
from ._progress import progress
from ._tensor import FP8Tensor
from .integrations.offload import meta_weight_advice, offloaded_by_accelerate, under
from .integrations.transformers_layers import EXPERT_COUNTS, conv1d_type, experts_transposed

__all__ = [
    "Fill",
    "Plan",
    "Target",
    "check_exclude",
    "check_overlap",
    "exclusion",
    "expert_weights",
    "find_targets",
    "layer_weights",
    "literal",
    "meta_fills",
    "quantize_target",
    "rule_matches",
    "select_targets",
    "targets_from_store",
    "unquantized_tensors",
]

logger = logging.getLogger("fp8ctx")



@dataclasses.dataclass(frozen=True)
class Target:
    """One weight to hold as FP8: its name in ``named_parameters()``, its layer's name, the object, the axis of
    its output channels, and how many leading dims index separate matrices (1 for mixture-of-experts tensors)."""

    name: str
    layer: str
    param: nn.Parameter
    channel_axis: int
    batch_dims: int = 0

    def layout(self, config: FP8Config) -> FP8Layout:
        """The layout ``config`` stores this weight in (its channel axis and batch dims with the config's scheme)."""
        return config.layout(self.channel_axis, self.batch_dims)


def exclusion(name: str, module: nn.Module, rules: tuple[ExcludeRule, ...]) -> ExcludeRule | None:
    """The first of ``rules`` that leaves the layer ``name`` out (see :func:`rule_matches`), or None."""
    for rule in rules:
        if rule_matches(rule, name, module) if isinstance(rule, str) else rule(name, module):
            return rule
    return None


def rule_matches(rule: str, layer_name: str, layer: nn.Module) -> bool:
    """Whether the name pattern ``rule`` names ``layer`` (called ``layer_name`` in its model).

    A rule names a layer when it matches the layer's name (fnmatch), a parent's name (``"decoder"`` covers
    ``"decoder.conv_in"``), or one of the layer's own parameters (``"decoder.conv_out.weight"``, a report row,
    names ``decoder.conv_out``). A leading ``"*."`` also matches at the root (``"*.lm_head"`` names a root-level
    ``lm_head``), as users read it. A pattern ending in a wildcard (``"decoder.*"``) names children only.
    """
    patterns = (rule, rule[2:]) if rule.startswith("*.") else (rule,)
    for pattern in patterns:
        if fnmatch.fnmatchcase(layer_name, pattern) or fnmatch.fnmatchcase(layer_name, pattern + ".*"):
            return True
        # a parameter is named by its own last component ("x.weight", "*.weight"); "x.*" means x's children
        if re.search(r"[*?[]", pattern.rpartition(".")[2]):
            continue
        prefix = f"{layer_name}." if layer_name else ""
        if any(fnmatch.fnmatchcase(prefix + name, pattern) for name, _ in layer.named_parameters(recurse=False)):
            return True
    return False


def literal(name: str) -> str:
    """``name`` as an exclude pattern that matches exactly it (fnmatch's special characters escaped)."""
    return re.sub(r"([*?[])", r"[\1]", name)


def check_exclude(modules: Sequence[nn.Module], rules: tuple[ExcludeRule, ...]) -> None:
    """Raise unless every name pattern in ``rules`` names a layer of at least one of ``modules``.

    An exclusion that matches nothing would hold the very layer the caller meant to keep dense, silently.

    Raises:
        FP8Error: names each pattern that matches nothing, the closest layer and parameter names, and what
            to write instead.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> check_exclude([model], ("0.weight", "*.0"))        # a parameter name; a root-level "*.0"
        >>> check_exclude([model], ("lm_head",))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        fp8ctx._errors.FP8Error: exclude pattern 'lm_head' matches no layer of Sequential; closest names: [...
    """
    patterns = [rule for rule in rules if isinstance(rule, str)]
    if not patterns:
        return
    layers = [(name, layer) for module in modules for name, layer in module.named_modules()]
    for pattern in patterns:
        if any(rule_matches(pattern, name, layer) for name, layer in layers):
            continue
        names = [name for name, _ in layers if name] + [
            name for module in modules for name, _ in module.named_parameters()
        ]
        close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4) or names[:5]
        owners = " or ".join(dict.fromkeys(type(module).__name__ for module in modules))
        raise FP8Error(
            f"exclude pattern {pattern!r} matches no layer of {owners}; closest names: {close} (of {len(names)}). "
            "Write a layer name as named_modules() gives it ('decoder.conv_out'), a parameter name "
            "('decoder.conv_out.weight'), a parent's name ('decoder'), or an fnmatch pattern ('*.conv_out', which "
            "also matches a root-level 'conv_out'); a predicate (name, module) -> bool is never checked"
        )


def _channel_axis(layer: nn.Module) -> int:
    # ConvTranspose weights are (in, out / groups, *kernel): their output channels live in dim 1
    return 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


# nn.MultiheadAttention's projection weights (out_proj is a Linear of its own); q/k/v_proj_weight exist instead of
# in_proj_weight when key/value sizes differ from the embedding size
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def layer_weights(layer: nn.Module, config: FP8Config, layer_name: str = "") -> list[tuple[str, int, int]]:
    """The weights ``config`` holds among ``layer``'s own parameters: ``(attribute, channel axis, batch dims)``.

    The selection rule, in one place (planning and the dense inventory both read it):

    - the ``weight`` of a layer of one of ``config.layers``' types;
    - ``nn.MultiheadAttention``'s input projections, when it is among ``config.layers``;
    - transformers' ``Conv1D`` (a Linear stored (in, out)) wherever ``nn.Linear`` is among ``config.layers``;
    - with ``config.experts``, every 3-D parameter of a module with an expert count (``num_experts``) whose first
      dim is that count: one matrix per expert, (out, in), or (in, out) where the module says ``is_transposed``;
    - any other parameter of 2 or more dims whose name (``layer_name.attribute``) matches ``config.include``.
    """
    chosen = _kind_weights(layer, config)
    if config.include:
        taken = {attribute for attribute, _, _ in chosen}
        for attribute, param in layer._parameters.items():
            name = f"{layer_name}.{attribute}" if layer_name else attribute
            if (
                attribute not in taken
                and isinstance(param, torch.Tensor)
                and param.dim() >= 2
                and any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include)
            ):
                chosen.append((attribute, 0, 0))
    return chosen


def _kind_weights(layer: nn.Module, config: FP8Config) -> list[tuple[str, int, int]]:
    params = layer._parameters
    if isinstance(layer, nn.MultiheadAttention):
        if not isinstance(layer, config.layers):
            return []
        return [(name, 0, 0) for name in _ATTENTION_WEIGHTS if isinstance(params.get(name), torch.Tensor)]
    if not isinstance(params.get("weight"), torch.Tensor):
        return expert_weights(layer) if config.experts else []
    if isinstance(layer, config.layers):
        return [("weight", _channel_axis(layer), 0)]
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d) and any(issubclass(nn.Linear, kind) for kind in config.layers):
        return [("weight", 1, 0)]
    return expert_weights(layer) if config.experts else []


def expert_weights(layer: nn.Module) -> list[tuple[str, int, int]]:
    """A module's mixture-of-experts tensors (``layer_weights``' triples), whatever ``config.experts`` says."""
    count = next((getattr(layer, name) for name in EXPERT_COUNTS if type(getattr(layer, name, None)) is int), None)
    if not count:
        return []
    axis = 2 if experts_transposed(layer) else 1
    return [
        (name, axis, 1)
        for name, param in layer._parameters.items()
        if isinstance(param, torch.Tensor) and param.dim() == 3 and param.shape[0] == count
    ]


def _excluded_parameters(module: nn.Module, rules: tuple[ExcludeRule, ...]) -> dict[int, str]:
    """``id`` of every parameter of an excluded layer -> that layer's name (the first one found)."""
    excluded: dict[int, str] = {}
    if not rules:
        return excluded
    for layer_name, layer in module.named_modules():
        if exclusion(layer_name, layer, rules) is not None:
            for p in layer.parameters(recurse=False):
                excluded.setdefault(id(p), layer_name)
    return excluded


def find_targets(module: nn.Module, config: FP8Config) -> list[Target]:
    """The weights of ``module`` that ``config`` holds as FP8, checked for values to quantize; nothing is
    changed.

    The ``weight`` of every layer of one of ``config.layers``' types, unless the layer (or a parent) is
    excluded. A weight tied into several layers is one target under its first name, and stays dense if
    any of those layers is excluded. Non-float weights are skipped.

    Returns:
        One :class:`Target` per distinct weight, in ``named_parameters()`` order of first appearance.

    Raises:
        FP8Error: a targeted weight on the meta device (says why and what to do), or a weight that is
            already held as FP8 (the module is inside ``fp8_weights`` already).
        TypeError: ``module`` is not an ``nn.Module``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> [t.name for t in find_targets(model, FP8Config(exclude=["2"]))]
        ['0.weight']
    """
    targets = select_targets(module, config)
    for target in targets:
        if target.param.is_meta:
            raise FP8Error(
                f"weight {target.name!r} of layer {target.layer or type(module).__name__!r} is on the meta device (no "
                f"values to quantize). {meta_weight_advice(module)}"
            )
    return targets


def select_targets(module: nn.Module, config: FP8Config) -> list[Target]:
    """The weights of ``module`` that ``config`` chooses, by names and types alone (meta weights included).

    Raises:
        FP8Error: a weight that is already held as FP8.
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fp8ctx works on torch.nn.Module objects, got {type(module).__name__}")
    canonical = {id(p): name for name, p in module.named_parameters()}
    # a weight tied to an excluded layer (lm_head tied to the embedding) stays dense: the exclusion wins
    excluded = _excluded_parameters(module, config.exclude)
    chosen: dict[int, Target] = {}
    for layer_name, layer in module.named_modules():
        for attribute, channel_axis, batch_dims in layer_weights(layer, config, layer_name):
            weight = layer._parameters[attribute]
            if id(weight) in chosen or id(weight) in excluded:
                continue
            name = canonical.get(id(weight))
            if name is None or isinstance(weight, FP8Tensor):  # None: swapped in by another thread since the walk
                raise FP8Error(
                    f"weight {name or layer_name + '.' + attribute!r} is already held as FP8: this module is inside "
                    "fp8_weights() or a running functional_call() already (in this or another thread). Enter one "
                    "fp8_weights() per module, on the outermost module you need."
                )
            if weight.dtype not in COMPUTE_DTYPES:
                logger.debug("fp8ctx: skipping %s (dtype %s is not a float type)", name, weight.dtype)
                continue
            chosen[id(weight)] = Target(name, layer_name, weight, channel_axis, batch_dims)
    order = {name: i for i, name in enumerate(canonical.values())}
    return sorted(chosen.values(), key=lambda target: order[target.name])


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
        if store is not None:
            _refuse_offloaded_entries(module, store)
        targets = targets_from_store(module, store) if store is not None else find_targets(module, config)
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

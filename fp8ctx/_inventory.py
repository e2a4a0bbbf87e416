"""What stays dense: every parameter of a module that is not held as FP8, with the reason, for coverage at a glance.

Selection decides what is held (``_select``); this module reads the same selection rule backwards and says, for each
parameter left out, why: a kind fp8ctx leaves dense on purpose (norms, biases, embeddings unless asked for), an
option (exclusion, ``layers=``), or something about the tensor itself (not a float dtype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._config import ExcludeRule, FP8Config
from ._exclude import exclusion
from ._layout import COMPUTE_DTYPES
from ._select import Target, expert_weights, find_targets, layer_weights  # noqa: F401  (the docstring examples use find_targets)

__all__ = ["DenseEntry", "DenseInventory", "dense_inventory"]


@dataclasses.dataclass(frozen=True)
class DenseEntry:
    """One parameter left dense: its name, its layer's type, shape, dtype, bytes, and why it is not FP8."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    reason: str


@dataclasses.dataclass(frozen=True)
class DenseInventory:
    """Every parameter left dense, and summaries by reason and by layer type.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> inventory = DenseInventory(tuple(dense_inventory(model, find_targets(model, FP8Config()), FP8Config())))
        >>> [(entry.name, entry.reason) for entry in inventory.entries][:3]
        [('0.weight', 'embedding (opt-in: layers=DEFAULT_LAYERS + (nn.Embedding,))'), ('1.bias', 'bias'), ('2.weight', 'norm')]
        >>> inventory.bytes, inventory.by_reason()["bias"]
        (208, 16)
    """

    entries: tuple[DenseEntry, ...]

    @property
    def bytes(self) -> int:
        """Bytes of all parameters left dense."""
        return sum(entry.bytes for entry in self.entries)

    @property
    def numel(self) -> int:
        """Elements of all parameters left dense."""
        return sum(_numel(entry.shape) for entry in self.entries)

    def by_reason(self) -> dict[str, int]:
        """Bytes left dense per reason, largest first."""
        return _totals((entry.reason, entry.bytes) for entry in self.entries)

    def by_type(self) -> dict[str, int]:
        """Bytes left dense per layer type, largest first."""
        return _totals((entry.layer_type, entry.bytes) for entry in self.entries)

    def lines(self, size: object = None) -> list[str]:
        """The section a report prints: one line per (layer type, reason), largest first.

        Args:
            size: a function formatting a byte count (default: plain bytes).
        """
        fmt = size if callable(size) else (lambda n: f"{n} B")
        groups: dict[tuple[str, str], list[DenseEntry]] = {}
        for entry in self.entries:
            groups.setdefault((entry.layer_type, entry.reason), []).append(entry)
        ordered = sorted(groups.items(), key=lambda item: -sum(e.bytes for e in item[1]))
        lines = [f"kept dense: {len(self.entries)} tensors, {fmt(self.bytes)}"]
        for (layer_type, reason), entries in ordered:
            count = f"{len(entries)} x " if len(entries) > 1 else ""
            lines.append(f"  {fmt(sum(e.bytes for e in entries)):>12}  {count}{layer_type}: {reason}")
        return lines


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _totals(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for key, value in pairs:
        totals[key] = totals.get(key, 0) + value
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


_NORMS = (nn.modules.normalization.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _rule_name(rule: ExcludeRule) -> str:
    if isinstance(rule, str):
        return f"pattern {rule!r}"
    return f"predicate {getattr(rule, '__qualname__', repr(rule))}"


def _structural_reason(layer: nn.Module, attribute: str, param: torch.Tensor, name: str) -> str:
    """Why a parameter that no selection rule picks stays dense, from what it is."""
    if isinstance(layer, nn.Embedding):
        return "embedding (opt-in: layers=DEFAULT_LAYERS + (nn.Embedding,))"
    if isinstance(layer, _NORMS) or "norm" in type(layer).__name__.lower():
        return "norm"
    if "bias" in attribute:
        return "bias"
    if any(name == attribute for name, _, _ in expert_weights(layer)):
        return "mixture-of-experts tensor (opt-in: experts=True)"
    if param.dim() <= 1:
        return f"{param.dim()}-D"
    if attribute == "weight":
        kind = type(layer).__name__
        return f"layer type {kind} not in layers (opt-in: layers=DEFAULT_LAYERS + ({kind},))"
    return (
        f"{param.dim()}-D parameter {attribute!r} of {type(layer).__name__} (not a layer weight; opt-in if it is a "
        f"matmul operand: include=[{name!r}])"
    )


def dense_inventory(module: nn.Module, targets: Sequence[Target], config: FP8Config) -> list[DenseEntry]:
    """Every distinct parameter of ``module`` that ``targets`` leave dense, with the reason; nothing is changed.

    Args:
        module: the model.
        targets: what is held (from ``find_targets`` or ``targets_from_store``).
        config: the options the targets were chosen with (for the reasons: exclusions, layer types).

    Returns:
        One :class:`DenseEntry` per parameter not held, under its first name, in ``named_parameters()`` order.
        Reasons: ``"not a float dtype (...)"``, ``"excluded by pattern '...'"`` / ``"excluded by predicate ..."``,
        ``"tied to excluded layer '...'"``, ``"not in the store"``, ``"embedding (opt-in: ...)"``, ``"norm"``,
        ``"bias"``, ``"0-D"`` / ``"1-D"``, ``"layer type X not in layers (opt-in: ...)"``, or a raw parameter
        that is not a layer weight.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2, bias=False))
        >>> config = FP8Config(exclude=["1"])
        >>> [(e.name, e.reason) for e in dense_inventory(model, find_targets(model, config), config)]
        [('0.bias', 'bias'), ('1.weight', "excluded by pattern '1'")]
    """
    held = {id(target.param) for target in targets}
    # where each parameter first appears, and every layer it appears in (a tie spans several)
    first: dict[int, tuple[str, nn.Module, str, torch.Tensor]] = {}
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for layer_name, layer in module.named_modules(remove_duplicate=False):
        for attribute, param in layer._parameters.items():
            if param is None:
                continue
            name = f"{layer_name}.{attribute}" if layer_name else attribute
            first.setdefault(id(param), (name, layer, attribute, param))
            owners.setdefault(id(param), []).append((layer_name, layer))
    selected = {
        id(layer._parameters[attribute])
        for layer_name, layer in module.named_modules()
        for attribute, _, _ in layer_weights(layer, config, layer_name)
    }
    entries = []
    for key, (name, layer, attribute, param) in first.items():
        if key in held:
            continue
        if key in selected:
            reason = _reason_for_selected(param, owners[key], config)
        else:
            reason = _structural_reason(layer, attribute, param, name)
        entries.append(
            DenseEntry(
                name,
                type(layer).__name__,
                tuple(param.shape),
                str(param.dtype).removeprefix("torch."),
                param.numel() * param.element_size(),
                reason,
            )
        )
    return entries


def _reason_for_selected(param: torch.Tensor, owners: list[tuple[str, nn.Module]], config: FP8Config) -> str:
    """Why a weight that the selection rule picks is nonetheless dense."""
    if param.dtype not in COMPUTE_DTYPES:
        return f"not a float dtype ({str(param.dtype).removeprefix('torch.')})"
    for index, (layer_name, layer) in enumerate(owners):
        rule = exclusion(layer_name, layer, config.exclude)
        if rule is not None:
            return f"excluded by {_rule_name(rule)}" if index == 0 else f"tied to excluded layer {layer_name!r}"
    return "not in the store"

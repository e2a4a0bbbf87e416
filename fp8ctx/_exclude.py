"""Exclude rules: which layers a name pattern or a predicate leaves dense, and the check that each pattern names one.

A rule is a name pattern (fnmatch, read as users read it: a layer, a parent, a parameter, a root-level ``*.name``)
or a predicate ``(name, module) -> bool``; planning (``_select``) and the dense inventory both ask here.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence

import torch  # noqa: F401  (check_exclude's example uses it)
from torch import nn

from ._config import ExcludeRule
from ._errors import FP8Error

__all__ = ["check_exclude", "excluded_parameters", "exclusion", "literal", "rule_matches"]


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


def excluded_parameters(module: nn.Module, rules: tuple[ExcludeRule, ...]) -> dict[int, str]:
    """``id`` of every parameter of an excluded layer -> that layer's name (the first one found)."""
    excluded: dict[int, str] = {}
    if not rules:
        return excluded
    for layer_name, layer in module.named_modules():
        if exclusion(layer_name, layer, rules) is not None:
            for p in layer.parameters(recurse=False):
                excluded.setdefault(id(p), layer_name)
    return excluded

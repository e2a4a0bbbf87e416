"""transformers' side of reading a checkpoint into a skeleton: its key renames, the keys it ignores, and
the non-persistent buffers it derives from the config (rotary ``inv_freq``) rather than reading them.

For any other module (diffusers models, plain ``nn.Module``) names are used as they are and nothing is
derived. transformers is imported only when the skeleton is one of its models.
"""

from __future__ import annotations

import copy
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["derive_buffers", "ignored_keys", "key_renamer"]

logger = logging.getLogger("fp8ctx")


def _pretrained(module: nn.Module) -> Any:
    """``module`` when it is a transformers ``PreTrainedModel`` (transformers already imported), else None."""
    library = sys.modules.get("transformers")
    cls = getattr(library, "PreTrainedModel", None) if library is not None else None
    return module if cls is not None and isinstance(module, cls) else None


def key_renamer(skeleton: nn.Module) -> Callable[[str], str | None]:
    """A function from a checkpoint key to the skeleton's name for it, as ``from_pretrained`` renames keys:
    the model's registered renames (legacy names, v5 key changes) then its ``base_model_prefix`` added or
    stripped. It gives None for a key that transformers would convert (merge or split tensors), which a
    tensor-by-tensor reader cannot do.
    """
    model = _pretrained(skeleton)
    if model is None:
        return lambda key: key
    names = {name: True for name in skeleton.state_dict(keep_vars=True)}
    names.update({name: True for name, _ in skeleton.named_parameters(remove_duplicate=False)})
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except (ImportError, AttributeError, TypeError) as error:  # another transformers version: prefix only
        logger.debug("fp8ctx: transformers' key mapping is not available (%r); matching names as they are", error)
        return lambda key: _prefixed(key, prefix, names)

    def rename(key: str) -> str | None:
        try:
            renamed, converter = rename_source_key(key, renamings, converters, prefix, names)
        except (TypeError, ValueError, AttributeError):  # a transformers version with another signature
            return _prefixed(key, prefix, names)
        return None if converter is not None else renamed

    return rename


def _prefixed(key: str, prefix: str | None, names: dict[str, bool]) -> str:
    if prefix is None or key in names:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:
        return key[len(prefix) + 1 :]
    return f"{prefix}.{key}" if f"{prefix}.{key}" in names else key


def ignored_keys(skeleton: nn.Module) -> list[re.Pattern[str]]:
    """The patterns of checkpoint keys the model's class says to ignore when loading (old buffers such as
    ``rotary_emb.inv_freq``)."""
    patterns = list(getattr(_pretrained(skeleton), "_keys_to_ignore_on_load_unexpected", None) or [])
    if any(name.endswith("rotary_emb.inv_freq") for name, _ in skeleton.named_buffers()):
        patterns.append(r"rotary_emb\.inv_freq")  # transformers moved this buffer; old checkpoints hold it per layer
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError):
            continue
    return compiled


def _owner(skeleton: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    path, _, attribute = name.rpartition(".")
    try:
        owner = skeleton.get_submodule(path)
    except AttributeError:
        return None
    return owner, attribute


def derive_buffers(skeleton: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The values of those of ``names`` that are non-persistent buffers transformers computes from the
    config, computed on the CPU as it initializes them (``_init_weights`` on a CPU copy of each owning
    module; the skeleton is not touched). Names it cannot compute are left out.

    The copies keep their parameters on the meta device, so this costs no memory for weights.
    """
    model = _pretrained(skeleton)
    values: dict[str, torch.Tensor] = {}
    if model is None or not hasattr(model, "_init_weights"):
        return values
    by_owner: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for name in names:
        found = _owner(skeleton, name)
        if found is not None and found[1] in found[0]._non_persistent_buffers_set:
            by_owner.setdefault(id(found[0]), (found[0], []))[1].append((name, found[1]))
    for owner, wanted in by_owner.values():
        # a copy whose own buffers are on the CPU and whose parameters stay on meta: initializing it writes
        # the buffers and costs nothing for the weights
        twin = copy.deepcopy(owner)
        for attribute, buffer in list(twin._buffers.items()):
            if buffer is not None:
                twin._buffers[attribute] = torch.empty_like(buffer, device="cpu")
        sentinels = {attribute: _sentinel(twin._buffers[attribute]) for _, attribute in wanted}
        try:
            with torch.no_grad():
                model._init_weights(twin)
        except Exception as error:  # the model's own code; the buffers then count as missing
            logger.debug("fp8ctx: %s._init_weights failed on %s: %r", type(model).__name__, type(owner).__name__, error)
            continue
        for name, attribute in wanted:
            value = twin._buffers[attribute]
            if value is not None and not _untouched(value, sentinels[attribute]):
                values[name] = value.detach().clone()
    return values


def _sentinel(buffer: torch.Tensor | None) -> torch.Tensor | None:
    """Fill ``buffer`` with a marker (NaN, or -1) so that a value ``_init_weights`` did not write is seen."""
    if buffer is None:
        return None
    buffer.fill_(float("nan") if buffer.is_floating_point() else -1)
    return buffer.clone()


def _untouched(value: torch.Tensor, sentinel: torch.Tensor | None) -> bool:
    if value.is_floating_point():
        return bool(torch.isnan(value).any())
    return sentinel is not None and torch.equal(value, sentinel)

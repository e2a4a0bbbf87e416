"""Selection: which weights of a module a config holds as FP8, each with its channel axis and batch dims.

The one selection rule (``layer_weights``: layer types, attention projections, Conv1D, mixture-of-experts tensors,
``include`` patterns), applied over a module with exclusions and tied weights (``select_targets``). Everything here
reads modules; nothing changes one.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import torch
from torch import nn

from ._config import FP8Config
from ._errors import FP8Error
from ._exclude import excluded_parameters
from ._layout import COMPUTE_DTYPES, FP8Layout
from ._tensor import FP8Tensor
from .integrations.offload import meta_weight_advice
from .integrations.transformers_layers import EXPERT_COUNTS, conv1d_type, experts_transposed

__all__ = ["Target", "expert_weights", "find_targets", "layer_weights", "select_targets"]

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
    excluded = excluded_parameters(module, config.exclude)
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

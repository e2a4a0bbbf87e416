"""`FP8Config`: the quantization choices, validated once when built, serialized in one place."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from . import kernels
from ._errors import FP8Error
from ._layout import FP8Layout, Granularity, parse_storage_dtype

__all__ = ["COMPUTE_MODES", "DEFAULT_LAYERS", "Exclude", "ExcludeRule", "FP8Config", "check_compute"]

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)
"""Layer types targeted by default (subclasses included). Add ``nn.Embedding`` to quantize tables.

``nn.Linear`` also covers transformers' ``Conv1D`` (GPT-2's Linear, stored (in, out)); for
``nn.MultiheadAttention`` the input projections are held (its ``out_proj`` is a Linear)."""

COMPUTE_MODES = ("weight_only", "fp8")

ExcludeRule = Union[str, Callable[[str, nn.Module], bool]]
Exclude = Union[ExcludeRule, Iterable[ExcludeRule], None]


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """How weights are held as FP8: format, scale granularity, which layers, and how Linear layers compute.

    Every public function takes one (``config=``) and the same fields as keywords; a keyword that is given
    (not ``None``) replaces the config's field.

    Args:
        storage_dtype: ``torch.float8_e4m3fn`` (default; 3 mantissa bits, range ±448) or
            ``torch.float8_e5m2`` (2 mantissa bits, range ±57344); ``"e4m3"`` / ``"e5m2"`` are accepted.
        granularity: ``"channel"`` (default: one scale per output channel; on trained weights the most
            accurate for its cost, docs/accuracy.md), ``"tensor"`` (one scale per weight) or ``"block"`` (one
            per ``block_size x block_size`` tile of the (out, in·kernel) view).
        block_size: tile edge for ``"block"``; a positive int.
        layers: layer types whose ``weight`` is held as FP8 (subclasses included); default
            :data:`DEFAULT_LAYERS`. One type or an iterable of types.
        exclude: layer names or patterns (fnmatch; a parent's name covers its children, a parameter name
            such as ``"lm_head.weight"`` names its layer, a leading ``"*."`` also matches at the root) and/or
            predicates ``(name, module) -> bool`` to leave out; one rule or an iterable of rules (read once,
            kept as a tuple, so a generator applies to every module), e.g. a plan from :func:`fp8ctx.plan`.
            A pattern that names no layer of the model raises :class:`FP8Error` when the model is given.
        compute: ``"weight_only"`` (default: activations stay in the compute dtype) or ``"fp8"`` (Linear
            layers also round activations to e4m3 per token and multiply in FP8; needs e4m3 storage and
            tensor or channel scales).
        experts: hold mixture-of-experts tensors (default True): the 3-D parameters (experts x out x in) of a
            module with an expert count (``num_experts``), as transformers' MoE models store them; one set of
            scales per expert, and a forward dequantizes only the experts its tokens are routed to.
        include: parameter-name patterns (fnmatch, on ``named_parameters()`` names) of further weights to hold
            beyond those of the layer types: raw parameters of 2 or more dims that a model uses as a matmul operand,
            such as a pooling probe or a projection kept as a bare ``nn.Parameter`` (output channels taken as
            dim 0). One pattern or an iterable of them. Routers and other layers with a ``weight`` are opted in
            with ``layers=`` instead.

    Raises:
        FP8Error: a field outside the values above (names the field and the value).

    Example:
        >>> config = FP8Config(granularity="block", block_size=64, exclude=["decoder.conv_out"])
        >>> config.granularity, config.exclude
        ('block', ('decoder.conv_out',))
        >>> FP8Config.from_dict(config.to_dict()) == config
        True
    """

    storage_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: Granularity = Granularity.CHANNEL
    block_size: int = 128
    layers: tuple[type[nn.Module], ...] = DEFAULT_LAYERS
    exclude: tuple[ExcludeRule, ...] = ()
    compute: str = "weight_only"
    experts: bool = True
    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # frozen: normalise spelled-out values once, at construction
        object.__setattr__(self, "storage_dtype", parse_storage_dtype(self.storage_dtype))
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise FP8Error(f"block_size must be a positive int, got {self.block_size!r}")
        object.__setattr__(self, "layers", _check_layers(self.layers))
        object.__setattr__(self, "exclude", _check_exclude(self.exclude))
        check_compute(self.compute, self.layout())
        if not isinstance(self.experts, bool):
            raise FP8Error(f"experts must be True or False, got {self.experts!r}")
        object.__setattr__(self, "include", _check_include(self.include))

    def layout(self, channel_axis: int = 0, batch_dims: int = 0) -> FP8Layout:
        """The layout one weight whose output channels lie on ``channel_axis`` is stored in (``batch_dims``
        leading dims indexing separate matrices, such as experts)."""
        return FP8Layout(self.granularity, self.block_size, channel_axis, self.storage_dtype, batch_dims)

    def replace(self, **changes: Any) -> FP8Config:
        """A copy with the fields in ``changes`` replaced (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields; layer types as ``"module:QualName"``, predicates as ``{"predicate": name}``."""
        return {
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "granularity": self.granularity.value,
            "block_size": self.block_size,
            "layers": [f"{layer.__module__}:{layer.__qualname__}" for layer in self.layers],
            "exclude": [rule if isinstance(rule, str) else {"predicate": _name(rule)} for rule in self.exclude],
            "compute": self.compute,
            "experts": self.experts,
            "include": list(self.include),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FP8Config:
        """The config :meth:`to_dict` wrote; missing fields take their defaults.

        Layer types are looked up among modules already imported (nothing is imported from a file's say-so).

        Raises:
            FP8Error: an unknown field, a layer type that is not loaded, a predicate (code cannot be read
                back from data: pass ``exclude=`` again), or a field with a bad value.
        """
        if not isinstance(data, Mapping):
            raise FP8Error(f"FP8Config.from_dict takes a mapping, got {type(data).__name__}")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise FP8Error(f"FP8Config has no field(s) {unknown}; fields are {sorted(fields)}")
        values = dict(data)
        if "layers" in values:
            values["layers"] = tuple(_layer_type(name) for name in _listed(values["layers"], "layers"))
        if "include" in values:
            values["include"] = tuple(_listed(values["include"], "include"))
        if "exclude" in values:
            rules = _listed(values["exclude"], "exclude")
            predicates = [rule for rule in rules if not isinstance(rule, str)]
            if predicates:
                raise FP8Error(
                    f"exclude holds predicate(s) {predicates}, which data cannot restore; pass exclude= again"
                )
            values["exclude"] = tuple(rules)
        return cls(**values)


def check_compute(compute: object, layout: FP8Layout) -> None:
    """Raise unless ``compute`` is a mode that weights stored as ``layout`` support."""
    if compute not in COMPUTE_MODES:
        raise FP8Error(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    if compute == "fp8" and not kernels.fp8_compute_supported(layout):
        raise FP8Error(
            "compute='fp8' multiplies e4m3 codes with one scale per output channel; it needs "
            "storage_dtype=torch.float8_e4m3fn and granularity 'tensor' or 'channel', got "
            f"{layout.storage_dtype} and {str(layout.granularity)!r}"
        )


def _check_layers(layers: Any) -> tuple[type[nn.Module], ...]:
    if isinstance(layers, type):
        layers = (layers,)
    try:
        layers = tuple(layers)
    except TypeError:
        raise FP8Error(f"layers must be an nn.Module type or a tuple of them, got {layers!r}") from None
    bad = [layer for layer in layers if not (isinstance(layer, type) and issubclass(layer, nn.Module))]
    if bad or not layers:
        raise FP8Error(
            f"layers must be a non-empty tuple of nn.Module types (e.g. fp8ctx.DEFAULT_LAYERS + (nn.Embedding,)), "
            f"got {bad or layers!r}"
        )
    return layers


def _check_exclude(exclude: Exclude) -> tuple[ExcludeRule, ...]:
    if exclude is None:
        return ()
    try:
        rules = (exclude,) if isinstance(exclude, str) or callable(exclude) else tuple(exclude)
    except TypeError:
        rules = (exclude,)
    for rule in rules:
        if not (isinstance(rule, str) or callable(rule)):
            raise FP8Error(
                "exclude must be a name pattern (str, fnmatch style), a predicate (name, module) -> bool, "
                f"or a list of those; got {rule!r}"
            )
    return rules


def _check_include(include: Any) -> tuple[str, ...]:
    patterns = (include,) if isinstance(include, str) else include
    try:
        patterns = tuple(patterns)
    except TypeError:
        patterns = (patterns,)
    bad = [pattern for pattern in patterns if not isinstance(pattern, str) or not pattern]
    if bad:
        raise FP8Error(
            f"include must be parameter-name patterns (non-empty str, fnmatch style, e.g. '*.probe'), got {bad[0]!r}"
        )
    return patterns


def _name(rule: Callable[..., Any]) -> str:
    return f"{getattr(rule, '__module__', '?')}:{getattr(rule, '__qualname__', repr(rule))}"


def _listed(value: Any, field: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise FP8Error(f"{field} must be a list in FP8Config data, got {value!r}")
    return list(value)


def _layer_type(name: object) -> type[nn.Module]:
    module_name, _, qualname = str(name).partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise FP8Error(
            f"layers names {name!r}, which is not an nn.Module type among the loaded modules; import it first"
        )
    return found

"""`FP8Store`: the FP8 weights of a module, built without touching it, reusable and savable."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from . import _numerics
from . import _ops  # noqa: F401  (registers the FP8 paths of Linear, Conv and Embedding that stored weights take)
from ._config import FP8Config
from ._errors import FP8Error
from ._tensor import FP8Layout, FP8Tensor, make_fp8_tensor

__all__ = ["DEFAULT_LAYERS", "FP8Store", "Target", "find_targets"]

logger = logging.getLogger("fp8ctx")

DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types targeted by default (subclasses included). Add ``nn.Embedding`` to quantize tables."""

ExcludeRule = Union[str, Callable[[str, nn.Module], bool]]
Exclude = Union[ExcludeRule, Iterable[ExcludeRule], None]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PROGRESS_MIN_LAYERS = 64


@dataclasses.dataclass(frozen=True)
class Target:
    """One weight to hold as FP8: its name in ``named_parameters()``, the object, and its layout."""

    name: str
    layer: str
    param: nn.Parameter
    channel_axis: int


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


def _excluded(name: str, module: nn.Module, rules: tuple[ExcludeRule, ...]) -> bool:
    for rule in rules:
        if isinstance(rule, str):
            # a pattern naming a parent excludes everything under it ("decoder" -> "decoder.conv_in")
            if fnmatch.fnmatchcase(name, rule) or fnmatch.fnmatchcase(name, rule + ".*"):
                return True
        elif rule(name, module):
            return True
    return False


def _channel_axis(layer: nn.Module) -> int:
    # ConvTranspose weights are (in, out / groups, *kernel): their output channels live in dim 1
    return 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0


def find_targets(module: nn.Module, layers: Any = DEFAULT_LAYERS, exclude: Exclude = None) -> list[Target]:
    """The weights of ``module`` that fp8ctx would hold as FP8, checked; nothing is changed.

    Args:
        module: the root module.
        layers: layer types whose ``weight`` is targeted (subclasses included).
        exclude: name patterns (fnmatch, matched against layer names) and/or predicates ``(name, module)``.

    Returns:
        One :class:`Target` per distinct weight, in ``named_parameters()`` order of first appearance.

    Raises:
        FP8Error: a bad ``layers``/``exclude`` option, a targeted weight on the meta device, or a weight
            that is already held as FP8 (the module is inside ``fp8_weights`` already).
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fp8ctx works on torch.nn.Module objects, got {type(module).__name__}")
    layers = _check_layers(layers)
    rules = _check_exclude(exclude)
    canonical = {id(p): name for name, p in module.named_parameters()}
    # a weight tied to an excluded layer (lm_head tied to the embedding) stays dense: the exclusion wins
    excluded = {
        id(p)
        for layer_name, layer in module.named_modules()
        if rules and _excluded(layer_name, layer, rules)
        for p in layer.parameters(recurse=False)
    }
    chosen: dict[int, Target] = {}
    for layer_name, layer in module.named_modules():
        if not isinstance(layer, layers):
            continue
        weight = dict(layer.named_parameters(recurse=False)).get("weight")
        if weight is None or id(weight) in chosen or id(weight) in excluded:
            continue
        name = canonical[id(weight)]
        if isinstance(weight, FP8Tensor):
            raise FP8Error(
                f"weight {name!r} is already held as FP8: this module is inside fp8_weights() already. "
                "Enter one fp8_weights() per module, on the outermost module you need."
            )
        if weight.is_meta:
            offloaded = any(hasattr(m, "_hf_hook") for m in module.modules())
            raise FP8Error(
                f"weight {name!r} of layer {layer_name or type(layer).__name__!r} is on the meta device (no values "
                "to quantize). "
                + (
                    "The model is offloaded by accelerate (cpu_offload / enable_sequential_cpu_offload / a device_map "
                    "with offload), which swaps dense weights in at every forward; fp8ctx cannot hold those as FP8. "
                    "Load the model onto its devices, or use enable_model_cpu_offload(), which fp8ctx supports."
                    if offloaded
                    else "Load the weights first, e.g. with from_pretrained(...) or load_state_dict(..., assign=True)."
                )
            )
        if weight.dtype not in _FLOAT_DTYPES:
            logger.debug("fp8ctx: skipping %s (dtype %s is not a float type)", name, weight.dtype)
            continue
        chosen[id(weight)] = Target(name, layer_name, weight, _channel_axis(layer))
    order = {name: i for i, name in enumerate(canonical.values())}
    return sorted(chosen.values(), key=lambda target: order[target.name])


def quantize_target(target: Target, config: FP8Config) -> FP8Tensor:
    """Quantize one target weight into a new FP8Tensor; the weight itself is only read.

    Raises:
        FP8Error: the weight holds NaN or Inf (names the parameter).
    """
    weight = target.param.detach()
    axis = target.channel_axis
    scale = _numerics.compute_scale(weight, config.storage_dtype, config.granularity, config.block_size, axis)
    if not bool(torch.isfinite(scale).all()):
        raise FP8Error(
            f"weight {target.name!r} contains NaN or Inf; FP8 cannot represent it. Fix the weight, or leave the "
            f"layer out with exclude=[{target.layer!r}]"
        )
    data = _numerics.quantize(weight, scale, config.storage_dtype, config.granularity, config.block_size, axis)
    layout = FP8Layout(config.granularity, config.block_size, axis)
    return make_fp8_tensor(data, scale, layout, weight.dtype, target.name)


def progress(items: Sequence[Any], description: str, enabled: bool | None) -> Iterable[Any]:
    """Wrap ``items`` in a tqdm bar when asked to, or (``None``) when there are many and tqdm is installed."""
    if enabled is False or (enabled is None and len(items) < _PROGRESS_MIN_LAYERS):
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="layer", leave=False)


class FP8Store(Mapping[str, FP8Tensor]):
    """The FP8 weights of a module: a mapping from parameter name to :class:`FP8Tensor`.

    Keys are spelled as ``module.named_parameters()`` spells them (``"decoder.conv_in.weight"``, or
    ``"weight"`` for a bare layer). Each entry has ``.dequantize()`` (original dtype) and ``.nbytes``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> store = FP8Store.from_module(model, granularity="channel")
        >>> sorted(store), store.nbytes            # 16*32 + 32*4 FP8 bytes, 32 + 4 float32 scales
        (['0.weight', '2.weight'], 784)
        >>> out = fp8ctx.functional_call(model, store, (torch.randn(2, 16),))   # (2, 4); model untouched
    """

    def __init__(self, entries: Mapping[str, FP8Tensor], config: FP8Config) -> None:
        for name, entry in entries.items():
            if not isinstance(entry, FP8Tensor):
                raise FP8Error(f"store entry {name!r} must be an FP8Tensor, got {type(entry).__name__}")
        self._entries = dict(entries)
        self.config = config

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        storage_dtype: torch.dtype = torch.float8_e4m3fn,
        granularity: str = "tensor",
        block_size: int = 128,
        layers: Any = DEFAULT_LAYERS,
        exclude: Exclude = None,
        progress_bar: bool | None = None,
    ) -> FP8Store:
        """Quantize ``module``'s targeted weights into a new store; ``module`` is only read.

        Args:
            module: the model (or a single layer).
            storage_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
            granularity: ``"tensor"``, ``"channel"`` or ``"block"`` (see :class:`FP8Config`).
            block_size: tile edge for ``"block"``.
            layers: layer types to target; default :data:`DEFAULT_LAYERS`.
            exclude: layer-name patterns and/or predicates ``(name, module) -> bool`` to leave out.
            progress_bar: show a tqdm bar; default: only for many layers, when tqdm is installed.

        Returns:
            A new :class:`FP8Store` on the weights' devices.

        Raises:
            FP8Error: a bad option, or a weight that is NaN/Inf, on the meta device or already FP8.
            TypeError: ``module`` is not an ``nn.Module``.
        """
        config = FP8Config(storage_dtype, granularity, block_size)
        targets = find_targets(module, layers, exclude)
        entries = {t.name: quantize_target(t, config) for t in progress(targets, "fp8ctx: quantizing", progress_bar)}
        logger.info("fp8ctx: quantized %d weights of %s", len(entries), type(module).__name__)
        return cls(entries, config)

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

    # -- what users ask of a store ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """FP8 codes plus scales, summed over entries."""
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def dense_nbytes(self) -> int:
        """What the same weights take in their original dtype."""
        return sum(entry.numel() * entry.element_size() for entry in self._entries.values())

    def dequantize(self) -> dict[str, torch.Tensor]:
        """Dense copies of every entry in its original dtype (a state-dict fragment)."""
        return {name: entry.dequantize() for name, entry in self._entries.items()}

    def to(self, device: torch.device | str) -> FP8Store:
        """A store with every entry's data and scales on ``device`` (FP8 stays FP8)."""
        return FP8Store({name: entry.to_device(device) for name, entry in self._entries.items()}, self.config)

    def __repr__(self) -> str:
        config = self.config
        return (
            f"FP8Store({len(self)} weights, {config.storage_dtype}, granularity={config.granularity!r}, "
            f"{self.nbytes / 2**20:.2f} MiB held vs {self.dense_nbytes / 2**20:.2f} MiB dense)"
        )

    # -- files -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store to a safetensors file (FP8 codes stay FP8 on disk).

        Raises:
            ImportError: safetensors is not installed (``pip install safetensors``).
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        layouts: dict[str, Any] = {}
        for name, entry in self._entries.items():
            tensors[name] = entry.qdata.contiguous()
            tensors[name + ":scale"] = entry.scale.contiguous()
            layouts[name] = {**dataclasses.asdict(entry.fp8_layout), "dtype": str(entry.dtype).removeprefix("torch.")}
        config = {
            "storage_dtype": str(self.config.storage_dtype).removeprefix("torch."),
            "granularity": self.config.granularity,
            "block_size": self.config.block_size,
        }
        metadata = {"fp8ctx.config": json.dumps(config), "fp8ctx.layouts": json.dumps(layouts)}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> FP8Store:
        """Read a store written by :meth:`save`, onto ``device``.

        Raises:
            FP8Error: the file was not written by ``FP8Store.save``.
        """
        from safetensors import safe_open

        try:
            opened = safe_open(os.fspath(path), framework="pt", device=str(device))
        except FileNotFoundError:
            raise
        except Exception as error:  # safetensors raises its own error type for a file of another format
            raise FP8Error(
                f"{os.fspath(path)!r} is not a safetensors file ({error}); write a store with FP8Store.save"
            ) from None
        with opened as handle:
            metadata = handle.metadata() or {}
            if "fp8ctx.layouts" not in metadata or "fp8ctx.config" not in metadata:
                raise FP8Error(f"{os.fspath(path)!r} is not an fp8ctx store (no fp8ctx metadata); write one with FP8Store.save")
            config = json.loads(metadata["fp8ctx.config"])
            layouts = json.loads(metadata["fp8ctx.layouts"])
            entries = {}
            for name, layout in layouts.items():
                dtype = getattr(torch, layout.pop("dtype"))
                entries[name] = make_fp8_tensor(
                    handle.get_tensor(name), handle.get_tensor(name + ":scale"), FP8Layout(**layout), dtype, name
                )
        storage_dtype = getattr(torch, config["storage_dtype"])
        return cls(entries, FP8Config(storage_dtype, config["granularity"], config["block_size"]))

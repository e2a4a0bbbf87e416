"""Entry points: the scoped ``fp8_weights`` context and the stateless ``functional_call``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Union

import torch
from torch import nn

from . import kernels
from ._config import FP8Config
from ._errors import FP8Error
from ._store import DEFAULT_LAYERS, Exclude, FP8Store, Target, find_targets, progress, quantize_target
from ._swap import Journal, find_slots
from ._tensor import FP8Tensor

__all__ = ["COMPUTE_MODES", "ORIGINALS", "fp8_weights", "functional_call"]

logger = logging.getLogger("fp8ctx")

ORIGINALS = ("cpu", "keep")
COMPUTE_MODES = ("weight_only", "fp8")
DEFAULT_COMPONENTS = ("vae", "text_encoder")

StoreResult = Union[FP8Store, tuple[FP8Store, ...], dict[str, FP8Store]]


def _is_pipeline(obj: Any) -> bool:
    # diffusers' DiffusionPipeline (and look-alikes) expose their modules through a `components` dict
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), Mapping)


def _pipeline_modules(pipe: Any, components: Sequence[str] | None) -> dict[str, nn.Module]:
    names = tuple(components) if components is not None else DEFAULT_COMPONENTS
    available = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
    missing = [name for name in names if name not in available]
    if missing:
        raise FP8Error(
            f"{type(pipe).__name__} has no module component(s) {missing}; components= takes some of {sorted(available)}"
        )
    return {name: available[name] for name in names}


def targets_from_store(module: nn.Module, store: Mapping[str, FP8Tensor]) -> list[Target]:
    """Match a store's entries to ``module``'s parameters, checking name, shape, dtype and device.

    Raises:
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
            raise FP8Error(f"weight {name!r} is already held as FP8: this module is inside fp8_weights() already")
        if param.shape != entry.shape or param.dtype != entry.dtype:
            raise FP8Error(
                f"store entry {name!r} is {tuple(entry.shape)} {entry.dtype}, the parameter is "
                f"{tuple(param.shape)} {param.dtype}; rebuild the store with FP8Store.from_module(module)"
            )
        if param.device != entry.device:
            raise FP8Error(
                f"store entry {name!r} is on {entry.device}, the parameter on {param.device}; "
                f"move the store with store.to({str(param.device)!r})"
            )
        targets.append(Target(name, name.rpartition(".")[0], param, entry.fp8_layout.channel_axis))
    return targets


class _FP8Weights:
    """The context manager returned by :func:`fp8_weights`."""

    def __init__(
        self,
        modules: list[nn.Module],
        names: list[str] | None,
        config: FP8Config,
        layers: Any,
        exclude: Exclude,
        originals: str,
        stores: list[FP8Store | None],
        progress_bar: bool | None,
        compute: str,
    ) -> None:
        self._modules = modules
        self._names = names
        self._config = config
        self._layers = layers
        self._exclude = exclude
        self._originals = originals
        self._stores = stores
        self._progress_bar = progress_bar
        self._compute = compute
        self._journal: Journal | None = None

    def _plan(self) -> list[list[Target]]:
        plans = []
        for module, store in zip(self._modules, self._stores):
            plans.append(
                targets_from_store(module, store)
                if store is not None
                else find_targets(module, self._layers, self._exclude)
            )
        owners: dict[int, int] = {}
        for index, targets in enumerate(plans):
            for target in targets:
                other = owners.setdefault(id(target.param), index)
                if other != index:
                    raise FP8Error(
                        f"weight {target.name!r} belongs to argument {other} and argument {index} of fp8_weights(); "
                        "pass each module once (the outer one if one contains the other)"
                    )
        return plans

    def __enter__(self) -> StoreResult:
        if self._journal is not None:
            raise FP8Error("this fp8_weights() context is already active; call fp8_weights(...) again for a new one")
        plans = self._plan()
        journal = Journal()
        stores: list[FP8Store] = []
        try:
            for module, targets, given in zip(self._modules, plans, self._stores):
                slots = find_slots(module, [t.param for t in targets])
                entries = {}
                bar = self._progress_bar if given is None else False  # nothing to wait for when reusing a store
                for target in progress(targets, "fp8ctx: quantizing", bar):
                    entry = given[target.name] if given is not None else quantize_target(target, self._config)
                    # a store the caller passed in gets a fresh wrapper in each slot (same codes and scales), so
                    # that module.half() or .to() inside the block converts the wrapper, not the caller's store
                    fresh = given is not None or self._compute != "weight_only"
                    stand_in = entry.with_compute(self._compute) if fresh else entry
                    for owner, attribute in slots[id(target.param)]:
                        journal.swap(owner, attribute, stand_in)
                    if self._originals == "cpu":
                        journal.offload(target.param)
                    entries[target.name] = entry
                stores.append(given if given is not None else FP8Store(entries, self._config))
        except BaseException:
            journal.undo()
            raise
        self._journal = journal
        logger.debug("fp8ctx: holding %d weights as FP8", sum(len(s) for s in stores))
        if self._names is not None:
            return dict(zip(self._names, stores))
        return stores[0] if len(stores) == 1 else tuple(stores)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        journal, self._journal = self._journal, None
        if journal is None:
            return False
        try:
            journal.undo()
        except BaseException:
            if exc is None:
                raise
            # the exception that ended the block propagates unchanged; the restore failure is logged
            logger.exception("fp8ctx: restoring the model failed while %s was propagating", exc_type.__name__)
        return False


def fp8_weights(
    *modules: Any,
    storage_dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: str = "tensor",
    block_size: int = 128,
    layers: Any = DEFAULT_LAYERS,
    exclude: Exclude = None,
    originals: str = "cpu",
    store: FP8Store | Sequence[FP8Store] | None = None,
    components: Sequence[str] | None = None,
    progress_bar: bool | None = None,
    compute: str = "weight_only",
) -> _FP8Weights:
    """Hold the weights of ``modules`` as FP8 inside a ``with`` block; restore them exactly on exit.

    Inside, each targeted weight is an :class:`FP8Tensor` (FP8 codes + float32 scales) that reports the
    original dtype, shape and device; each layer dequantizes its weight only while it runs (on the GPU's
    fused path it never materializes at all). On exit, whatever ended the block, every module holds the
    very same Parameter objects with bit-identical values, and nothing else on it has changed.

    Args:
        *modules: ``nn.Module`` objects, or a diffusers pipeline (then ``components`` picks its modules).
        storage_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        granularity: ``"tensor"``, ``"channel"`` or ``"block"``.
        block_size: tile edge for ``"block"``.
        layers: layer types whose weights are held as FP8; default :data:`DEFAULT_LAYERS`.
        exclude: layer-name patterns (fnmatch) and/or predicates ``(name, module) -> bool`` to leave out.
        originals: ``"cpu"`` moves the original weights to pinned host memory so device memory is freed;
            ``"keep"`` leaves them in place (fastest exit, no copy). CPU-resident weights stay in place.
        store: a store (one per module) to reuse instead of quantizing; options must not contradict it.
        components: for a pipeline, the components to target; default ``("vae", "text_encoder")``.
        progress_bar: show a tqdm bar while quantizing; default only for many layers.
        compute: ``"weight_only"`` (default: activations stay in the compute dtype) or ``"fp8"``: Linear
            layers also round activations to e4m3 per token and multiply in FP8 (``torch._scaled_mm`` on
            sm_89+ GPUs, an exact emulation elsewhere); needs e4m3 storage and tensor/channel scales.
            Inference only: with autograd recording, layers compute weight-only.

    Returns:
        A context manager. ``as`` gives the :class:`FP8Store` (one module), a tuple of stores (several),
        or a dict by component name (a pipeline).

    Raises:
        TypeError: an argument that is neither a module nor a pipeline.
        FP8Error: a bad option, a NaN/Inf or meta weight, a module that is already inside the context.
            The model is left exactly as it was.

    Example:
        >>> vae = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3))
        >>> with fp8ctx.fp8_weights(vae, granularity="channel") as store:
        ...     image = vae(torch.randn(1, 3, 16, 16))      # (1, 3, 12, 12), weights held as FP8
        >>> vae[0].weight.dtype                               # the original Parameter, same bits
        torch.float32
    """
    config = FP8Config(storage_dtype, granularity, block_size)
    if originals not in ORIGINALS:
        raise FP8Error(f"originals must be one of {ORIGINALS}, got {originals!r}")
    if not modules:
        raise TypeError("fp8_weights() needs at least one module, e.g. fp8_weights(pipe.vae)")
    names: list[str] | None = None
    if len(modules) == 1 and _is_pipeline(modules[0]):
        picked = _pipeline_modules(modules[0], components)
        names, module_list = list(picked), list(picked.values())
    else:
        if components is not None:
            raise FP8Error("components= applies to a pipeline argument, e.g. fp8_weights(pipe, components=['vae'])")
        module_list = []
        for position, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"fp8_weights() argument {position} must be a torch.nn.Module or a diffusers pipeline, "
                    f"got {type(module).__name__}"
                )
            module_list.append(module)
    stores = check_stores(store, len(module_list), config, layers, exclude)
    _check_compute(compute, [s.config for s in stores if s is not None] or [config])
    return _FP8Weights(module_list, names, config, layers, exclude, originals, stores, progress_bar, compute)


def _check_compute(compute: str, configs: list[FP8Config]) -> None:
    if compute not in COMPUTE_MODES:
        raise FP8Error(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    if compute == "fp8":
        for config in configs:
            if not kernels.fp8_compute_supported(config.storage_dtype, config.granularity):
                raise FP8Error(
                    "compute='fp8' multiplies e4m3 codes with one scale per output channel; it needs "
                    "storage_dtype=torch.float8_e4m3fn and granularity 'tensor' or 'channel', got "
                    f"{config.storage_dtype} and {config.granularity!r}"
                )


def check_stores(
    store: Any, count: int, config: FP8Config, layers: Any, exclude: Exclude
) -> list[FP8Store | None]:
    if store is None:
        return [None] * count
    stores = [store] if isinstance(store, FP8Store) else list(store) if isinstance(store, (list, tuple)) else None
    if stores is None or len(stores) != count or not all(isinstance(s, FP8Store) for s in stores):
        raise FP8Error(f"store= takes one FP8Store per module ({count} here), got {store!r}")
    for given in stores:
        defaults = FP8Config()
        for option in ("storage_dtype", "granularity", "block_size"):
            asked, held = getattr(config, option), getattr(given.config, option)
            if asked != getattr(defaults, option) and asked != held:
                raise FP8Error(f"{option}={asked!r} contradicts the given store, which holds {option}={held!r}")
    if layers is not DEFAULT_LAYERS or exclude is not None:
        raise FP8Error("layers= and exclude= choose weights to quantize; with store= the store already decides")
    return stores


def functional_call(
    module: nn.Module,
    store: Mapping[str, FP8Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    compute: str = "weight_only",
) -> Any:
    """Run ``module(*args, **kwargs)`` with the store's FP8 weights in place of its own.

    Like ``torch.func.functional_call``: the module is left untouched (same objects, bits and storage),
    whatever the call does, and no original weight is moved.

    Args:
        module: the module the store was built from (or one with the same parameter names and shapes).
        store: an :class:`FP8Store`, or any mapping of parameter name to :class:`FP8Tensor`.
        args: positional arguments (a tuple, or a single tensor).
        kwargs: keyword arguments.
        compute: ``"weight_only"`` or ``"fp8"``, as in :func:`fp8_weights`.

    Returns:
        Whatever ``module`` returns.

    Raises:
        FP8Error: the store does not fit the module.

    Example:
        >>> encoder = torch.nn.Linear(16, 8)
        >>> store = fp8ctx.FP8Store.from_module(encoder, granularity="channel")
        >>> fp8ctx.functional_call(encoder, store, torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functional_call() takes a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    targets = targets_from_store(module, store)
    held = [FP8Config(e.storage_dtype, e.fp8_layout.granularity) for e in store.values()] if compute == "fp8" else []
    _check_compute(compute, held)
    slots = find_slots(module, [t.param for t in targets])
    journal = Journal()
    try:
        for target in targets:
            entry = store[target.name]
            stand_in = entry.with_compute(compute)  # a fresh wrapper: conversions inside leave the store alone
            for owner, attribute in slots[id(target.param)]:
                journal.swap(owner, attribute, stand_in)
        return module(*args, **(kwargs or {}))
    finally:
        journal.undo()

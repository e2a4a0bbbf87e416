"""Entry points: the scoped ``fp8_weights`` context and the stateless ``functional_call``.

Both check every option when called, plan with ``_plan`` and hold with ``_hold``; neither touches a module
itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Union

import torch
from torch import nn

from ._config import Exclude, FP8Config
from ._errors import FP8Error
from ._hold import Hold
from ._options import check_components, check_originals, check_progress_bar, is_store_dict, resolve, stores_for
from ._exclude import check_exclude
from ._plan import Plan, check_overlap
from ._store import FP8Store
from ._tensor import FP8Tensor
from .integrations.pipelines import is_pipeline, pipeline_modules

__all__ = ["fp8_weights", "functional_call"]

StoreResult = Union[FP8Store, tuple[FP8Store, ...], dict[str, FP8Store]]
StoreArgument = Union[FP8Store, Sequence[FP8Store], Mapping[str, FP8Store], None]


class FP8Weights:
    """The context manager :func:`fp8_weights` returns: plans when entered, holds inside, restores on exit.

    One object can be entered again after it has exited (it plans afresh each time); entering it while it is
    active raises. Its exit is resumable: if an interrupt (a second Ctrl-C) stops it part way,
    :attr:`restored` is False and :meth:`restore` finishes it. An interrupted entry undoes itself the same
    way (``with`` never calls ``__exit__`` when ``__enter__`` raises).
    """

    def __init__(
        self,
        modules: list[nn.Module],
        names: list[str] | None,
        config: FP8Config,
        stores: list[Mapping[str, FP8Tensor] | None],
        originals: str,
        progress_bar: bool | None,
    ) -> None:
        self._modules = modules
        self._names = names
        self._config = config
        self._stores = stores
        self._originals = originals
        self._progress_bar = progress_bar
        self._hold: Hold | None = None  # set before anything changes, cleared once everything is back

    @property
    def restored(self) -> bool:
        """False from entering until the model is exactly as before: inside the block, or after an exit that
        was interrupted (then call :meth:`restore`)."""
        return self._hold is None

    def restore(self) -> None:
        """Finish restoring the model (an exit or entry that an interrupt stopped part way); idempotent.

        Raises:
            Whatever a restore step raised; the steps that failed stay pending, so it can be called again.
        """
        hold = self._hold
        if hold is not None:
            hold.close(None)
            self._hold = None

    def __enter__(self) -> StoreResult:
        if self._hold is not None:
            raise FP8Error(
                "this fp8_weights() context is already active"
                + ("" if self._hold.restored else " (or its last exit was interrupted: call .restore())")
                + "; call fp8_weights(...) again for a new one"
            )
        plans = [Plan.make(module, self._config, store) for module, store in zip(self._modules, self._stores)]
        check_overlap(plans)
        hold = Hold("fp8_weights", compute=self._config.compute, offload=self._originals == "cpu",
                    progress_bar=self._progress_bar)
        self._hold = hold  # from here on an interrupted entry can be completed by restore()
        try:
            held = hold.enter(plans)
            stores = [given if given is not None else FP8Store(entries) for given, entries in zip(self._stores, held)]
            return dict(zip(self._names, stores)) if self._names is not None else (
                stores[0] if len(stores) == 1 else tuple(stores)
            )
        except BaseException:
            self.restore()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        hold = self._hold
        if hold is not None:
            hold.close(exc)
            if hold.restored:  # else (a restore step failed while exc propagated) restore() can retry
                self._hold = None
        return False


def fp8_weights(
    *modules: Any,
    config: FP8Config | None = None,
    storage_dtype: torch.dtype | str | None = None,
    granularity: str | None = None,
    block_size: int | None = None,
    layers: Any = None,
    exclude: Exclude = None,
    compute: str | None = None,
    originals: str | None = None,
    store: StoreArgument = None,
    components: Sequence[str] | None = None,
    progress_bar: bool | None = None,
) -> FP8Weights:
    """Hold the weights of ``modules`` as FP8 inside a ``with`` block; restore them exactly on exit.

    Inside, each targeted weight is an :class:`FP8Tensor` (FP8 codes + float32 scales) that reports the
    original dtype, shape and device; each layer dequantizes its weight only while it runs (on the GPU's
    fused path it never materializes at all). On exit, whatever ended the block, every module holds the
    very same Parameter objects with bit-identical values, and nothing else on it has changed.

    Every option is checked here, when the function is called; the block plans and quantizes when entered.

    Args:
        *modules: ``nn.Module`` objects, or a diffusers pipeline (then ``components`` picks its modules).
        config: an :class:`FP8Config`; the keywords below that are given (not ``None``) replace its fields.
        storage_dtype, granularity, block_size, layers, exclude, compute: as in :class:`FP8Config`.
        originals: ``"cpu"`` (default) moves the original weights to pinned host memory so device memory is
            freed; ``"keep"`` leaves them in place (fastest exit, no copy). CPU-resident weights stay in place.
        store: stores to reuse instead of quantizing: one per module (a store, or a tuple/list), or for a
            pipeline the dict ``fp8_weights(pipe)`` gave. A stated storage dtype, granularity or block size
            must match its entries; ``layers`` / ``exclude`` keywords do not go with it.
        components: for a pipeline, the components to hold (a list of names, or one name as a string);
            default those of ``("vae", "text_encoder")`` that the pipeline has loaded, or the names of a dict
            given as ``store``.
        progress_bar: show a tqdm bar while quantizing; default only for many layers.

    Returns:
        A context manager. ``as`` gives the :class:`FP8Store` (one module), a tuple of stores (several),
        or a dict by component name (a pipeline).

    Raises:
        TypeError: an argument that is neither a module nor a pipeline.
        FP8Error: a bad option (here), or on entering a NaN/Inf or meta weight, a module that is already
            held (by another block or a running ``functional_call``, in any thread: checked atomically), a
            store that does not fit. The model is left exactly as it was.

    Example:
        >>> vae = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3))
        >>> with fp8ctx.fp8_weights(vae, granularity="channel") as store:
        ...     image = vae(torch.randn(1, 3, 16, 16))      # (1, 3, 12, 12), weights held as FP8
        >>> vae[0].weight.dtype                               # the original Parameter, same bits
        torch.float32
    """
    options = resolve(config, storage_dtype=storage_dtype, granularity=granularity, block_size=block_size,
                      layers=layers, exclude=exclude, compute=compute)
    originals, progress_bar = check_originals(originals), check_progress_bar(progress_bar)
    components = check_components(components)
    if not modules:
        raise TypeError("fp8_weights() needs at least one module, e.g. fp8_weights(pipe.vae)")
    names: list[str] | None = None
    if len(modules) == 1 and is_pipeline(modules[0]):
        if components is None and is_store_dict(store):
            components = list(store)  # the dict fp8_weights(pipe, components=...) gave names them
        picked = pipeline_modules(modules[0], components)
        names, module_list = list(picked), list(picked.values())
    else:
        if components is not None:
            raise FP8Error("components= applies to a pipeline argument, e.g. fp8_weights(pipe, components=['vae'])")
        for position, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"fp8_weights() argument {position} must be a torch.nn.Module or a diffusers pipeline, "
                    f"got {type(module).__name__}"
                )
        module_list = list(modules)
    stores = stores_for(store, names, len(module_list), options)
    check_exclude(module_list, options.config.exclude)
    return FP8Weights(module_list, names, options.config, stores, originals, progress_bar)


def functional_call(
    module: nn.Module,
    store: Mapping[str, FP8Tensor],
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    config: FP8Config | None = None,
    compute: str | None = None,
) -> Any:
    """Run ``module(*args, **kwargs)`` with the store's FP8 weights in place of its own.

    Like ``torch.func.functional_call``: the module is left untouched (same objects, bits and storage),
    whatever the call does, and no original weight is moved. Calls on one model from several threads (a
    server sharing a text encoder) run one at a time, each entirely on FP8 weights.

    Args:
        module: the module the store was built from (or one with the same parameter names and shapes).
        store: an :class:`FP8Store`, or any mapping of parameter name to :class:`FP8Tensor`.
        args: positional arguments (a tuple, or a single tensor).
        kwargs: keyword arguments.
        config: an :class:`FP8Config`; its storage dtype, granularity and block size must match the store's
            entries, its ``compute`` is used unless ``compute`` is given.
        compute: ``"weight_only"`` or ``"fp8"``, as in :class:`FP8Config`.

    Returns:
        Whatever ``module`` returns.

    Raises:
        FP8Error: a bad option, or a store that does not fit the module or contradicts ``config``; the module
            is held by an ``fp8_weights`` block, or by a call of this same thread.

    An interrupt (Ctrl-C) while the module is being restored does not stop the restore; if the restore
    cannot finish (a step fails, or interrupts keep coming), the exception leaving the call says so in a
    note, and the next ``functional_call`` or ``fp8_weights`` on the module finishes it first.

    Example:
        >>> encoder = torch.nn.Linear(16, 8)
        >>> store = fp8ctx.FP8Store.from_module(encoder, granularity="channel")
        >>> fp8ctx.functional_call(encoder, store, torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """
    options = resolve(config, compute=compute)
    if not isinstance(module, nn.Module):
        raise TypeError(f"functional_call() takes a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(store, Mapping):
        raise TypeError(f"store must be an FP8Store (FP8Store.from_module(module)), got {type(store).__name__}")
    stores_for(store, None, 1, options)
    if not isinstance(args, tuple):
        args = (args,)
    hold = Hold("functional_call", compute=options.config.compute, offload=False)
    error: BaseException | None = None
    try:
        hold.claim_tree(module)  # calls on one model from several threads run one at a time
        hold.enter([Plan.make(module, options.config, store)])
        return module(*args, **(kwargs or {}))
    except BaseException as raised:
        error = raised
        raise
    finally:
        hold.end_call(error)  # resumable like fp8_weights' exit; never leaves stand-ins silently
